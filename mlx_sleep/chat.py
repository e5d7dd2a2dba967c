"""`mlx-sleep chat`: a local chat whose memory outlives its context window.

Each user line is one turn: the conversation is rendered by the tokenizer's chat template and
only the text the engine has not consumed yet is fed (so a long session costs the same per
token as a short one). The engine sleeps on its own when the window fills during a reply (a
forced sleep) and, when the user has typed nothing for `idle_delay` seconds and the window is at
least `idle_fill` full, in a background thread between turns (an idle sleep). A line typed
during an idle sleep cancels it between two passes (the engine is then exactly as before) and
runs as soon as the sleep has stopped; nothing typed is lost. Ctrl-C stops a reply or a /sleep,
not the session. The session is saved after every turn and sleep, and on exit.

On a terminal, input is read with prompt_toolkit (the line editor IPython and ptpython use):
line editing, the session's own turns as history, pastes of any length kept whole (bracketed
paste, not the tty's 4,095-character line buffer), Alt-Enter for a new line; the idle sleep runs
in a thread while the prompt waits. On a pipe, lines are read from the raw file descriptor
(select + os.read) with a timeout, one line per turn. On both, a line starting with three
double quotes opens a block that the next line ending with them closes (one multi-line turn).
Notices ([window full], passes, speed, [saved]) go to stderr, so a piped reply on stdout is the
reply alone.
"""

import codecs
import contextlib
import os
import resource
import select
import signal
import sys
import termios
import threading
import time

import mlx.core as mx

from .generate import Reply, chat_prompt, make_sampling, stream_reply

HELP = """commands:
  /status   window fill, consolidations, tokens seen, fast-weight and process memory
  /sleep    consolidate the live window now (Ctrl-C cancels between passes)
  /save     save the session now (it is also saved after every turn and on exit)
  /reset    clear the memory: fast weights, window and conversation
  /forget   roll back the last consolidation (the window it learned is forgotten)
  /help     this list
  /quit     save and leave (Ctrl-D too)
anything else is sent to the model; Ctrl-C stops a reply"""


class LineReader:
    """Lines from a file descriptor, with a timeout, that never read past what they return."""

    def __init__(self, fd: int):
        self.fd, self.buffer, self.eof = fd, "", False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _fill(self, timeout) -> bool:
        if self.eof:
            return False
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        data = os.read(self.fd, 65536)
        if not data:
            self.eof = True
            self.buffer += self.decoder.decode(b"", final=True)
        else:
            self.buffer += self.decoder.decode(data)
        return True

    def ready(self, timeout=0.0) -> bool:
        """A line (or the end of input) can be read without waiting."""
        if "\n" in self.buffer or self.eof:
            return True
        self._fill(timeout)
        return "\n" in self.buffer or self.eof

    def readline(self, timeout=None):
        """The next line (with its newline), "" at the end of input, or None when `timeout`
        seconds passed without a complete line."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while "\n" not in self.buffer and not self.eof:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._fill(left) and deadline is not None and time.monotonic() >= deadline:
                return None
        if "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            return line.rstrip("\r") + "\n"
        line, self.buffer = self.buffer, ""
        return line  # the last line without a newline, or "" at the end


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


def process_memory() -> str:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024
    )
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return f"{mib(rss)} resident, {mib(peak)} peak"
    except OSError:
        return f"{mib(peak)} peak resident"


def plural(n: int, word: str) -> str:
    """ "1 pass", "2 passes", "3 consolidations"."""
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


BLOCK_QUOTES = '"' * 3  # a line starting with these opens a multi-line turn; one ending closes it


def read_block(first: str, next_line) -> str:
    """A block: `first` starts with BLOCK_QUOTES; lines from `next_line()` are added until one
    ends with them (or the input ends: None). Returns the text between the quotes."""
    lines, text = [], first[3:]
    while not text.rstrip().endswith(BLOCK_QUOTES):
        lines.append(text)
        text = next_line()
        if text is None:  # end of input: the block ends here
            return "\n".join(lines).strip("\n")
    lines.append(text.rstrip()[:-3])
    return "\n".join(lines).strip("\n")


@contextlib.contextmanager
def no_echo(fd):
    """Keys typed while a reply streams are not echoed into it (the next prompt shows them)."""
    try:
        old = termios.tcgetattr(fd)
    except (termios.error, OSError):
        yield
        return
    new = list(old)
    new[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, new)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


def consumed_text(tokenizer, ids, delta: str, reply, fed: int) -> str:
    """The text of what the engine consumed in a turn: `fed` tokens of the prompt `ids` (the
    text `delta`) and then of the reply. A forced sleep that was stopped can end the turn inside
    the prompt; the next turn then feeds the rest (its text follows the common prefix)."""
    if fed < len(ids):
        return tokenizer.decode(ids[:fed])
    return delta + tokenizer.decode(reply.tokens[: fed - len(ids)])


def record_turn(conv, tokenizer, start: int, common: str, delta: str, ids, reply, replay=None):
    """Record in `conv` (a session.Conversation) what a turn consumed: from position `start`,
    the ids `replay` re-fed after a rewind (a branch, None otherwise: `common` is then the text
    of the mark they lead to), then the prompt `ids` (the text `delta` after `common`), then
    the reply, as far as the engine took them. Marks are added only where the engine's tokens
    are exactly the text before them: not after a turn whose held text was not a prefix of its
    prompt."""
    engine, rewound, replay = conv.engine, replay is not None, list(replay or [])
    prompt = replay + list(ids)
    fed = engine.offset - start
    consumed = prompt[:fed] + list(reply.tokens[: max(0, fed - len(prompt))])
    text = common + consumed_text(tokenizer, ids, delta, reply, fed - len(replay))
    anchor = (start + len(replay), len(common))
    aligned = rewound or common == conv.fed_text
    marks = []
    if aligned:
        marks.append(anchor)
        if fed >= len(prompt):  # the prompt was fed whole: its end and the turn's are marks
            marks += [(start + len(prompt), len(common) + len(delta)), (engine.offset, len(text))]
    kept = anchor if aligned else (start, len(common))
    conv.record_turn(start, consumed, text, kept, marks, rewound)


def live_window_due(engine, idle_fill: float) -> bool:
    """The live window is not empty and is at least `idle_fill` of L."""
    return engine.window_len > 0 and engine.window_len >= idle_fill * engine.sleep.window


def idle_sleep_due(engine, idle_delay: float, idle_fill: float) -> bool:
    """The idle rule (chat and serve): idle sleep is on, and windows are pending (deferred
    sleep) or the live window is due."""
    return idle_delay > 0 and (bool(engine.pending) or live_window_due(engine, idle_fill))


def sleep_when_idle(engine, idle_fill: float, cancel=None, on_pass=None) -> bool:
    """The idle rule's sleep: deepen the pending windows, then consolidate the live window if it
    is due. True when all of it was done; a cancel keeps the windows deepened before it."""
    if live_window_due(engine, idle_fill):
        return engine.consolidate(cancel=cancel, on_pass=on_pass)
    pending = len(engine.pending)
    return engine.catch_up(cancel, on_pass) == pending


class Chat:
    def __init__(
        self,
        session,
        tokenizer,
        out=None,
        max_tokens=512,
        stop=(),
        idle_delay=60.0,
        idle_fill=0.5,
        sampling=None,
        err=None,
    ):
        self.session, self.engine, self.tokenizer = session, session.engine, tokenizer
        self.out, self.err = out, err  # None: sys.stdout / sys.stderr when written (patched)
        self.max_tokens, self.stop = max_tokens, list(stop)
        self.idle_delay, self.idle_fill = idle_delay, idle_fill
        self.sampler, self.processors = make_sampling(**(sampling or {}))
        self.interrupt = threading.Event()
        self.engine.on_forced_sleep = self.forced_sleep

    def say(self, text="", end="\n"):
        out = self.out or sys.stdout
        out.write(text + end)
        out.flush()

    def note(self, text, end="\n"):
        """A notice, not part of a reply: stderr."""
        (self.out or sys.stdout).flush()
        err = self.err or sys.stderr
        err.write(text + end)
        err.flush()

    def forced_sleep(self) -> dict:
        """The window filled during a turn: a line per pass, and Ctrl-C stops it between passes
        (the reply stops there and the window stays full until the next turn)."""
        e = self.engine
        self.note(
            f"\n[window full ({e.sleep.window} tokens): sleeping, "
            f"{plural(e.sleep.loops, 'pass')}; Ctrl-C stops]"
        )
        return dict(
            cancel=self.interrupt.is_set,
            on_pass=lambda i, n: self.note(f"[sleeping: pass {i}/{n}]"),
        )

    # -- one turn ------------------------------------------------------------------------------
    def turn(self, text: str):
        messages = self.session.messages + [{"role": "user", "content": text}]
        rendered = chat_prompt(self.tokenizer, messages)
        fed = self.session.fed_text
        # Feed what the engine has not seen. With a template that re-renders earlier turns the
        # same way (ChatML and most others) `fed` is a prefix of `rendered`; otherwise the part
        # after the longest common prefix is the best that can be done without a rollback.
        common = os.path.commonprefix([rendered, fed])
        delta = rendered[len(common) :]
        ids = self.tokenizer.encode(delta, add_special_tokens=False)
        if not ids:
            return
        self.interrupt.clear()
        reply = Reply()
        sleeps, start, pending = self.engine.sleeps, self.engine.offset, len(self.engine.pending)
        mx.reset_peak_memory()
        for piece in stream_reply(
            self.engine,
            self.tokenizer,
            ids,
            self.max_tokens,
            self.stop,
            self.interrupt.is_set,
            reply,
            sampler=self.sampler,
            logits_processors=self.processors,
        ):
            self.say(piece, end="")
        if reply.stopped == "interrupted":
            self.note(" [stopped]", end="")
        self.say("")
        if self.engine.sleeps > sleeps:
            self.note(
                f"[slept {plural(self.engine.sleeps - sleeps, 'time')} during this turn; "
                f"{plural(self.engine.sleeps, 'consolidation')} so far]"
            )
        if len(self.engine.pending) > pending:
            self.note(
                f"[{plural(len(self.engine.pending), 'window')} waiting to be slept on (deferred "
                "sleep): memory is shallow until the next idle moment or /sleep]"
            )
        self.note(f"[{reply.speed(len(ids))}]")
        record_turn(self.session, self.tokenizer, start, common, delta, ids, reply)
        self.session.messages = messages + [{"role": "assistant", "content": reply.text}]
        self.session.save()

    # -- commands ------------------------------------------------------------------------------
    def status(self):
        e = self.engine
        fast = sum(
            a.nbytes
            for s, block in zip(e.state, e.model.sleep_blocks())
            for k, a in s.items()
            if k in block.mixer.carried
        )
        L = e.sleep.window
        self.say(
            f"session {self.session.name}: {e.offset} tokens seen, window {e.window_len}/{L} "
            f"({100 * e.window_len / L:.0f}%), {plural(e.sleeps, 'consolidation')} "
            f"(N = {e.sleep.loops}, {e.sleep.eviction} eviction), "
            f"{len(e.snapshots)}/{e.history} snapshots for /forget"
        )
        if e.pending or e.defer:
            self.say(
                f"deferred sleep: {plural(len(e.pending), 'window')} pending (of at most "
                f"{e.max_pending}), slept 1 pass until the next idle moment or /sleep"
            )
        self.say(f"memory: fast weights {mib(fast)}, process {process_memory()}")

    def sleep_now(self, cancel=None, label="sleeping", idle=False) -> bool:
        """Deepen the pending windows and consolidate the live window (`idle`: only if it is
        due), with a line per pass; saves what was done."""
        e = self.engine
        pending, n = len(e.pending), e.window_len
        if idle and not live_window_due(e, self.idle_fill):
            n = 0
        if pending == 0 and n == 0:
            self.say("[nothing to consolidate: the window is empty]")
            return True
        on_pass = lambda i, N: self.note(f"[{label}: pass {i}/{N}]")  # noqa: E731
        if idle:
            done = sleep_when_idle(e, self.idle_fill, cancel, on_pass)
        else:
            done = e.consolidate(cancel=cancel, on_pass=on_pass)
        deepened = pending - len(e.pending)
        if deepened or done:
            self.session.save()
            what = [f"deepened {plural(deepened, 'pending window')}"] if deepened else []
            what += [f"consolidated {n} tokens"] if done and n else []
            if done and n and e.last_passes < e.sleep.loops:  # stopped: kept (sleep.partial)
                what[-1] += f" at {e.last_passes} of {plural(e.sleep.loops, 'pass')}"
            self.note(f"[{' and '.join(what)}; {plural(e.sleeps, 'consolidation')} so far]")
        if not done:
            self.note(
                "[sleep cancelled; the session is as it was"
                + (", but for the windows deepened" if deepened else "")
                + ", and the next sleep starts again from pass 1]"
            )
        return done

    def command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        cmd = line.split()[0].lower()
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/status":
            self.status()
        elif cmd == "/sleep":
            self.interrupt.clear()
            self.sleep_now(cancel=self.interrupt.is_set)
        elif cmd == "/save":
            size = self.session.save()
            self.say(f"[saved session {self.session.name} ({mib(size)}) in {self.session.path}]")
        elif cmd == "/reset":
            system = [m for m in self.session.messages[:1] if m["role"] == "system"]
            self.session.clear(system)
            self.session.save()
            self.say("[memory cleared: fast weights, window and conversation]")
        elif cmd == "/forget":
            if self.engine.forget():
                self.session.save()
                self.say(
                    f"[forgot the last consolidation; {self.engine.sleeps} remain, "
                    f"{len(self.engine.snapshots)} more can be rolled back]"
                )
            else:
                self.say("[nothing to forget: no consolidation in the history]")
        else:
            self.say(f"unknown command {cmd}; /help lists them")
        return True

    # -- idle sleep ----------------------------------------------------------------------------
    def wants_idle_sleep(self) -> bool:
        return idle_sleep_due(self.engine, self.idle_delay, self.idle_fill)

    def idle_notice(self) -> str:
        e, what = self.engine, []
        if e.pending:
            what.append(plural(len(e.pending), "pending window"))
        if live_window_due(e, self.idle_fill):
            what.append("the live window")
        return f"[idle: sleeping on {' and '.join(what)}]"

    def idle_sleep(self, reader: LineReader):
        """Pipes: consolidate in a background thread until done or until a line arrives."""
        cancel = threading.Event()
        self.note(self.idle_notice())
        worker = threading.Thread(
            target=lambda: self.sleep_now(cancel.is_set, "idle sleep", idle=True)
        )
        worker.start()
        while worker.is_alive():
            if reader.ready(0.05) or self.interrupt.is_set():
                cancel.set()
                break
        worker.join()  # the main thread touches the engine only once the sleep has stopped

    def idle_sleeper(self):
        """Terminals: a thread that sleeps on the window after `idle_delay` quiet seconds while
        the prompt waits. Returns stop(), which cancels it between passes and joins it."""
        quit_ = threading.Event()

        def wait_then_sleep():
            if not quit_.wait(self.idle_delay):
                self.note(self.idle_notice())
                self.sleep_now(quit_.is_set, "idle sleep", idle=True)

        worker = threading.Thread(target=wait_then_sleep, daemon=True)
        worker.start()

        def stop():
            quit_.set()
            worker.join()  # the engine is the main thread's again

        return stop

    # -- the loop ------------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """One input (a line or a block); False means quit."""
        if line.strip().startswith("/"):
            return self.command(line.strip())
        if line.strip():
            self.turn(line)
        return True

    def banner(self):
        e, s = self.engine, self.engine.sleep
        self.note(
            f"model {self.session.identity['path']}: N = {s.loops}, L = {s.window}, "
            f"{s.eviction} eviction"
        )
        self.note(
            f"session {self.session.name}: {e.offset} tokens, "
            f"{plural(e.sleeps, 'consolidation')}. /help for commands, {BLOCK_QUOTES} or "
            "Alt-Enter for several lines, Ctrl-D to leave."
        )

    def run(self, fd=None):
        if fd is None:
            try:
                fd = sys.stdin.fileno()
            except (AttributeError, OSError, ValueError):
                fd = None  # a stream without a descriptor (an embedding app, a test runner)

        def on_sigint(signum, frame):
            self.interrupt.set()

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            if fd is None:
                self.run_lines(sys.stdin)
            elif os.isatty(fd):
                self.run_terminal(fd)
            else:
                self.run_pipe(fd)
        finally:
            signal.signal(signal.SIGINT, previous)
            self.session.save()
            self.note(f"[saved session {self.session.name}]")

    def run_pipe(self, fd):
        reader = LineReader(fd)
        while True:
            self.interrupt.clear()
            line = reader.readline(self.idle_delay if self.wants_idle_sleep() else None)
            if line is None:  # quiet for idle_delay seconds
                self.idle_sleep(reader)
                continue
            if line == "":
                return
            if line.lstrip().startswith(BLOCK_QUOTES):

                def next_line():
                    more = reader.readline()
                    return more.rstrip("\n") if more else None

                line = read_block(line.lstrip().rstrip("\n"), next_line)
            if not self.handle(line.rstrip("\n")):
                return

    def run_lines(self, stream):
        """Lines from a text stream, one turn each (no idle sleep: it cannot wait on one)."""
        lines = iter(stream)
        for line in lines:
            self.interrupt.clear()
            if line.lstrip().startswith(BLOCK_QUOTES):
                line = read_block(line.strip(), lambda: next(lines, None))
            if not self.handle(line.rstrip("\n")):
                return

    def run_terminal(self, fd):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.patch_stdout import patch_stdout

        history = InMemoryHistory()
        for m in self.session.messages:
            if m["role"] == "user":
                history.append_string(m["content"])
        keys = KeyBindings()

        @keys.add("escape", "enter")  # Alt-Enter (Esc then Enter): a new line in the input
        def _(event):
            event.current_buffer.insert_text("\n")

        prompt = PromptSession(history=history, key_bindings=keys)
        self.banner()

        def ask(text=">>> "):
            with patch_stdout(raw=True):
                return prompt.prompt(text)

        while True:
            self.interrupt.clear()
            stop_idle = self.idle_sleeper() if self.wants_idle_sleep() else None
            try:
                line = ask()
                if line.lstrip().startswith(BLOCK_QUOTES):
                    line = read_block(line.lstrip(), lambda: ask("... "))
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
                continue
            except EOFError:  # Ctrl-D
                self.note("")
                return
            finally:
                if stop_idle is not None:
                    stop_idle()
            with no_echo(fd):
                if not self.handle(line):
                    return
