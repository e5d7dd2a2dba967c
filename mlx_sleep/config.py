"""Model and sleep settings.

Both are plain dataclasses that round-trip through JSON (`to_dict` / `from_dict`) and validate
themselves on construction, so a bad flag or a hand-edited config.json fails with one clear line
instead of a shape error deep inside a layer.
"""

import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Optional, Tuple

import numpy as np

LAYER_TYPES = ("attn", "swa", "gdn", "jet")
EVICTION_MODES = ("hard", "sliding")
# Limits that bound time and memory before anything is allocated (memory itself is checked
# against the machine by check_memory).
MAX_INT = 2**31 - 1  # MLX shapes are 32-bit
MAX_LOOPS = 1024  # N: each pass is a full forward (and backward) over the window (the paper: <= 6)
MAX_WINDOW = 1 << 20
MAX_PENDING = 64  # deferred windows: each keeps its tokens and a copy of the state it began with
MAX_BLOCKS = 4096  # blocks the sleep engine runs per pass (Ouro: total_ut_steps x stack)
MAX_DIM = (
    1 << 24
)  # any one size (vocabulary, width, heads): products of two still fit memory checks


class ConfigError(ValueError):
    """A setting is out of range or inconsistent; the message says which and what to do."""


def show(value) -> str:
    """A value from outside, short enough for a one-line error."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'} of {len(value)}"
    text = repr(value[:37]) + "..." if isinstance(value, str) and len(value) > 40 else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_ok(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT
    if hint is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            return False
        item = args[0] if args else None
        return item is None or all(_type_ok(v, item) for v in value)
    return True


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is tuple:
        return f"a list of {len(args)} integers"
    if origin is list:
        item = {int: "integers", str: "strings", float: "numbers", bool: "booleans"}
        return "a list of " + item.get(args[0], "values") if args else "a list"
    if hint is dict or origin is dict:
        return "an object"
    return {
        int: f"an integer (|x| <= {MAX_INT})",
        float: "a finite number",
        bool: "true or false",
        str: "a string",
        dict: "an object",
    }.get(hint, getattr(hint, "__name__", str(hint)))


def check_type(name: str, value, hint, where: str = ""):
    """`value` has the type `hint` says (see check_types), else ConfigError naming `name`."""
    if not _type_ok(value, hint):
        raise ConfigError(f"{where}{name} must be {_type_name(hint)} (got {show(value)})")


def check_depth_losses(value, where: str = "depth_losses") -> Optional[tuple]:
    """((lo, hi, weight), ...) of a per-depth objective (sleep.loss_depths): the loss at a depth
    drawn per step from lo..hi (lo = hi: a fixed depth), weighted. Entries may be given as
    (depth, weight) or (lo, hi, weight); depths in 1..MAX_LOOPS with lo <= hi, weights finite
    and >= 0, one > 0. None: none."""
    if value is None:
        return None
    want = (
        f"{where} must be DEPTH:WEIGHT or LO-HI:WEIGHT entries with depths in 1..{MAX_LOOPS}, "
        "weights finite and >= 0 and one > 0, e.g. 3:1,4-6:0.5"
    )
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{want} (got {show(value)})")
    entries = []
    for entry in value:
        if isinstance(entry, (list, tuple)) and len(entry) == 2:
            entry = (entry[0], entry[0], entry[1])
        if not (
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and all(_type_ok(d, int) and 1 <= d <= MAX_LOOPS for d in entry[:2])
            and entry[0] <= entry[1]
            and _type_ok(entry[2], float)
            and entry[2] >= 0
        ):
            raise ConfigError(f"{want} (got {show(entry)})")
        entries.append((int(entry[0]), int(entry[1]), float(entry[2])))
    if not any(w > 0 for *_, w in entries):
        raise ConfigError(f"{want} (got {show(value)})")
    return tuple(entries)


def parse_depth_losses(text: str, where: str = "--depth-losses") -> tuple:
    """'3:1,4-6:0.5' -> ((3, 3, 1.0), (4, 6, 0.5)), checked (check_depth_losses)."""
    entries = []
    for item in str(text).split(","):
        depths, sep, weight = item.strip().partition(":")
        lo, dash, hi = depths.partition("-")
        try:
            entries.append((int(lo), int(hi if dash else lo), float(weight)) if sep else None)
        except ValueError:
            entries.append(None)
    if None in entries:
        raise ConfigError(
            f"{where} takes DEPTH:WEIGHT or LO-HI:WEIGHT entries such as 3:1,4-6:0.5 (got {text!r})"
        )
    return check_depth_losses(entries, where)


def json_bool(d: dict, key: str, default: bool = False) -> bool:
    """A true/false setting read from a JSON object: absent or null gives `default`; anything
    but a JSON boolean is refused (bool("false") would be True)."""
    value = d.get(key)
    if value is None:
        return default
    check_type(key, value, bool)
    return value


def check_types(obj):
    """Every field of the dataclass `obj` has the type its annotation says (bools are not
    integers, floats are finite, integers fit MLX's 32-bit shapes): one line naming it."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        if name not in {f.name for f in fields(obj)}:
            continue
        value = getattr(obj, name)
        if not _type_ok(value, hint):
            raise ConfigError(
                f"{type(obj).__name__}: {name} must be {_type_name(hint)} (got {show(value)})"
            )


def check_int(name: str, value, lo: Optional[int] = None, hi: Optional[int] = None) -> None:
    """The one integer check: a ValueError such as 'n_bits must be >= 3 (got 1)' (a bool or
    2.5 is not an integer)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer (got {show(value)})")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo} (got {value})")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi} (got {value})")


def machine_memory() -> int:
    """Physical memory in bytes (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(nbytes: int, what: str, force: bool = False):
    """Refuse (unless `force`) what cannot fit the machine's memory."""
    total = machine_memory()
    if not force and total and nbytes > total:
        raise ConfigError(
            f"{what} needs about {nbytes / 2**30:,.1f} GiB, more than this "
            f"machine's {total / 2**30:,.1f} GiB; make it smaller "
            "(or pass --force to try anyway)"
        )


def middle_half_core(num_layers: int) -> Tuple[int, int]:
    """The looped blocks of a converted model by default: the middle half, [n // 4, n // 4 + n // 2).

    This is the paper's "middle 14 of 28" for Jet-Nemotron 2B (blocks 7..20) and extends to
    other depths (4B, 36 blocks: 9..26; a 6-block test model: 1..3)."""
    start = num_layers // 4
    return (start, start + max(1, num_layers // 2))


def check_core(core: Tuple[int, int], num_blocks: int, what: str = ""):
    start, stop = core
    if not 0 <= start < stop <= num_blocks:
        raise ConfigError(
            f"core must be START:STOP with 0 <= START < STOP <= {num_blocks}"
            f"{what} (got {start}:{stop})"
        )


class ModelConfigBase:
    """What every model config (a dataclass with a `core` field) shares: the looped core range
    over its `num_sleep_blocks` blocks, validation on construction, and the JSON round trip."""

    core_what = ""  # how the error message names the blocks the core counts

    def __post_init__(self):
        check_types(self)
        self.core = tuple(self.core) if self.core is not None else None  # JSON gives a list
        self.validate()

    @property
    def num_sleep_blocks(self) -> int:
        """Blocks one sleep pass runs (a looped model unrolls its loops)."""
        return self.num_layers

    @property
    def core_range(self) -> Tuple[int, int]:
        return self.core if self.core is not None else (0, self.num_sleep_blocks)

    def validate(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is int and value > MAX_DIM:
                raise ConfigError(f"{f.name} must be <= {MAX_DIM} (got {value})")
        if self.num_sleep_blocks > MAX_BLOCKS:
            raise ConfigError(
                f"{self.num_sleep_blocks} blocks{self.core_what} is more than "
                f"{MAX_BLOCKS}, the most one pass runs"
            )
        check_core(self.core_range, self.num_sleep_blocks, self.core_what)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d.get("core") is not None:
            d["core"] = list(d["core"])
        return d

    @classmethod
    def from_dict(cls, d: dict):
        return _from_dict(cls, d)


def _from_dict(cls, d: dict):
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__}: settings must be a JSON object (got {show(d)})")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(
            f"{cls.__name__}: unknown setting(s) {', '.join(map(str, unknown))[:200]}; "
            f"known: {', '.join(sorted(known))}"
        )
    missing = [
        f.name
        for f in fields(cls)
        if f.name not in d and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ConfigError(f"{cls.__name__}: missing setting(s) {', '.join(missing)}")
    return cls(**d)


@dataclass
class ModelConfig(ModelConfigBase):
    """The hybrid model: a stack of attention / Gated DeltaNet blocks, each followed by a SwiGLU MLP.

    `layers` is a comma-separated pattern, one entry per block:
      attn  causal attention (GQA, RoPE with global positions)
      swa   attention restricted to the last `swa_window` positions
      gdn   Gated DeltaNet with a short causal conv on q, k, v (Qwen3-Next / fla style)
      jet   Gated DeltaNet whose values go through a dynamic causal conv (Jet-Nemotron)
    `core` = (start, stop) is the looped range of blocks: blocks before it (the prelude) and after
    it (the coda) run once per chunk, the core runs N times during sleep. None = whole stack.
    """

    vocab_size: int
    hidden_size: int = 128
    layers: str = "attn,gdn,attn,gdn"
    intermediate_size: Optional[int] = None  # default: 4 * hidden_size * 2/3 rounded to 32 (SwiGLU)
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # default: num_heads (MHA)
    head_dim: Optional[int] = None  # default: hidden_size // num_heads
    attention_bias: bool = False
    rope_theta: float = 10000.0
    swa_window: Optional[int] = None
    norm_eps: float = 1e-6
    # Gated DeltaNet
    gdn_k_heads: Optional[int] = None  # default: num_heads
    gdn_v_heads: Optional[int] = None  # default: gdn_k_heads; a multiple of gdn_k_heads (GVA)
    gdn_head_k_dim: Optional[int] = None  # default: head_dim
    gdn_head_v_dim: Optional[int] = None  # default: gdn_head_k_dim
    gdn_norm_eps: Optional[float] = None  # eps of the gated output RMSNorm; default: norm_eps
    conv_size: int = 4
    jet_generator_reduction: int = 8  # Jet dynamic-conv kernel generator width = value dim / this
    mlp: bool = True
    tie_embeddings: bool = True
    core: Optional[Tuple[int, int]] = None

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def layer_types(self) -> list:
        return [t.strip() for t in self.layers.split(",") if t.strip()]

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def resolved(self, name):
        """The value of an optional size with its documented default applied."""
        v = getattr(self, name)
        if v is not None:
            return v
        defaults = {
            "intermediate_size": lambda: 32 * max(1, round(self.hidden_size * 8 / 3 / 32)),
            "num_kv_heads": lambda: self.num_heads,
            "head_dim": lambda: self.hidden_size // self.num_heads,
            "gdn_k_heads": lambda: self.num_heads,
            "gdn_v_heads": lambda: self.resolved("gdn_k_heads"),
            "gdn_head_k_dim": lambda: self.resolved("head_dim"),
            "gdn_head_v_dim": lambda: self.resolved("gdn_head_k_dim"),
            "gdn_norm_eps": lambda: self.norm_eps,
        }
        return defaults[name]()

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)

        need(self.vocab_size >= 2, f"vocab_size must be >= 2 (got {self.vocab_size})")
        for name in (
            "hidden_size",
            "intermediate_size",
            "head_dim",
            "gdn_head_k_dim",
            "gdn_head_v_dim",
            "swa_window",
        ):
            value = getattr(self, name)
            need(value is None or value >= 1, f"{name} must be >= 1 (got {value})")
        for name in ("rope_theta", "norm_eps", "gdn_norm_eps"):
            value = getattr(self, name)
            need(value is None or value > 0, f"{name} must be > 0 (got {value})")
        types = self.layer_types
        need(len(types) >= 1, "layers must name at least one block, e.g. 'attn,gdn,attn,gdn'")
        bad = [t for t in types if t not in LAYER_TYPES]
        need(
            not bad,
            f"unknown layer type(s) {bad} in layers={self.layers!r}; use {', '.join(LAYER_TYPES)}",
        )
        need(self.num_heads >= 1, f"num_heads must be >= 1 (got {self.num_heads})")
        kv = self.resolved("num_kv_heads")
        need(
            kv >= 1 and self.num_heads % kv == 0,
            f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv})",
        )
        need(
            self.resolved("head_dim") >= 1,
            f"head_dim is 0: hidden_size ({self.hidden_size}) < num_heads ({self.num_heads})",
        )
        for name in ("intermediate_size", "head_dim", "gdn_head_k_dim", "gdn_head_v_dim"):
            need(
                self.resolved(name) <= MAX_DIM,
                f"{name} must be <= {MAX_DIM} (got {self.resolved(name)} from hidden_size "
                f"{self.hidden_size})",
            )
        if {"attn", "swa"} & set(types):
            need(
                self.resolved("head_dim") % 2 == 0,
                f"head_dim ({self.resolved('head_dim')}) must be even for RoPE attention; "
                "choose hidden_size and num_heads so hidden_size / num_heads is even",
            )
        hk, hv = self.resolved("gdn_k_heads"), self.resolved("gdn_v_heads")
        need(
            hk >= 1 and hv % hk == 0, f"gdn_v_heads ({hv}) must be a multiple of gdn_k_heads ({hk})"
        )
        need(self.conv_size >= 1, f"conv_size must be >= 1 (got {self.conv_size})")
        if "swa" in types:
            need(
                self.swa_window is not None and self.swa_window >= 1,
                "layers contain 'swa' but swa_window is not set (>= 1)",
            )
        if "jet" in types:
            need(
                self.jet_generator_reduction >= 1,
                f"jet_generator_reduction must be >= 1 (got {self.jet_generator_reduction})",
            )
        super().validate()


@dataclass
class SleepConfig:
    """How the model sleeps: N passes over each window of L tokens before it is evicted.

    loops     N, total passes over a context window (N = 1 is the plain hybrid)
    window    L, the most tokens a window holds before it must be consolidated and evicted
    eviction  "hard": clear all KV at a window boundary (only fast weights carry on);
              "sliding": keep the last L-1 tokens' KV (from the final pass), so every query sees
              itself plus at most L-1 earlier tokens, as in sliding-window attention
    """

    loops: int = 1
    window: int = 64
    eviction: str = "hard"
    # A sleep stopped after pass n < N keeps the memory of pass n, for a model trained to answer
    # at every depth 1..N (--depth-losses covering them sets it); otherwise a stopped sleep is
    # undone, since a model trained at N alone is only consistent after all N passes.
    partial: bool = False

    def __post_init__(self):
        for name, what, top in (
            ("loops", "loops (N)", MAX_LOOPS),
            ("window", "window (L)", MAX_WINDOW),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{what} must be an integer >= 1 (got {show(value)})")
            if value > top:
                raise ConfigError(f"{what} must be <= {top} (got {value})")
        if not isinstance(self.eviction, str) or self.eviction not in EVICTION_MODES:
            raise ConfigError(
                f"eviction must be one of {', '.join(EVICTION_MODES)} (got {self.eviction!r})"
            )
        if not isinstance(self.partial, bool):
            raise ConfigError(f"partial must be true or false (got {show(self.partial)})")

    @property
    def attention_window(self) -> Optional[int]:
        """The most keys a query may see (itself included), or None for unbounded."""
        return self.window if self.eviction == "sliding" else None

    @property
    def keep_after_eviction(self) -> int:
        return self.window - 1 if self.eviction == "sliding" else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.partial:  # as files written before the setting existed have it
            del d["partial"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SleepConfig":
        return _from_dict(cls, d)
