"""`mlx-sleep chat`: a local chat whose memory outlives its context window.

Each user line is one turn: the conversation is rendered by the tokenizer's chat template and
only the text the engine has not consumed yet is fed (so a long session costs the same per
token as a short one). The engine sleeps on its own when the window fills during a reply (a
forced sleep) and, when the user has typed nothing for `idle_delay` seconds and the window is at
least `idle_fill` full, in a background thread between turns (an idle sleep). A line typed
during an idle sleep cancels it between two passes (the engine is then exactly as before) and
runs as soon as the sleep has stopped; nothing typed is lost. Ctrl-C stops a reply or a /sleep,
not the session. The session is saved after every turn and sleep, and on exit.

Input is read from the raw file descriptor (select + os.read), not sys.stdin, so it works the
same on a terminal and on a pipe (one line per turn) and can wait with a timeout.
"""

import codecs
import os
import resource
import select
import signal
import sys
import threading
import time


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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return f"{mib(rss)} resident, {mib(peak)} peak"
    except OSError:
        return f"{mib(peak)} peak resident"


class Chat:
    def __init__(self, session, tokenizer, out=sys.stdout, max_tokens=512, stop=(),
                 idle_delay=60.0, idle_fill=0.5, sampling=None):
        self.session, self.engine, self.tokenizer, self.out = session, session.engine, tokenizer, out
        self.max_tokens, self.stop = max_tokens, list(stop)
        self.idle_delay, self.idle_fill = idle_delay, idle_fill
        self.sampler, self.processors = make_sampling(**(sampling or {}))
        self.interrupt = threading.Event()
        self.engine.on_full = lambda: self.say(
            f"\n[window full ({self.engine.sleep.window} tokens): sleeping, "
            f"{self.engine.sleep.loops} passes]")

    def say(self, text="", end="\n"):
        self.out.write(text + end)
        self.out.flush()

    # -- one turn ------------------------------------------------------------------------------
    def turn(self, text: str):
        messages = self.session.messages + [{"role": "user", "content": text}]
        rendered = chat_prompt(self.tokenizer, messages)
        fed = self.session.fed_text
        # Feed what the engine has not seen. With a template that re-renders earlier turns the
        # same way (ChatML and most others) `fed` is a prefix of `rendered`; otherwise the part
        # after the longest common prefix is the best that can be done without a rollback.
        common = os.path.commonprefix([rendered, fed])
        delta = rendered[len(common):]
        ids = self.tokenizer.encode(delta, add_special_tokens=False)
        if not ids:
            return
        self.interrupt.clear()
        reply = Reply()
        sleeps = self.engine.sleeps
        for piece in stream_reply(self.engine, self.tokenizer, ids, self.max_tokens, self.stop,
                                  self.interrupt.is_set, reply, sampler=self.sampler,
                                  logits_processors=self.processors):
            self.out.write(piece)
            self.out.flush()
        self.say("" if reply.stopped != "interrupted" else " [stopped]")
        if self.engine.sleeps > sleeps:
            self.say(f"[slept {self.engine.sleeps - sleeps} time(s) during this turn; "
                     f"{self.engine.sleeps} consolidations so far]")
        self.session.messages = messages + [{"role": "assistant", "content": reply.text}]
        self.session.fed_text = common + delta + self.tokenizer.decode(reply.tokens[:reply.consumed])
        self.session.save()

    # -- commands ------------------------------------------------------------------------------
    def status(self):
        e = self.engine
        fast = sum(a.nbytes for s, block in zip(e.state, e.model.sleep_blocks())
                   for k, a in s.items() if k in block.mixer.carried)
        L = e.sleep.window
        self.say(f"session {self.session.name}: {e.offset} tokens seen, window {e.window_len}/{L} "
                 f"({100 * e.window_len / L:.0f}%), {e.sleeps} consolidations "
                 f"(N = {e.sleep.loops}, {e.sleep.eviction} eviction), "
                 f"{len(e.snapshots)}/{e.history} snapshots for /forget")
        self.say(f"memory: fast weights {mib(fast)}, process {process_memory()}")

    def sleep_now(self, cancel=None, label="sleeping") -> bool:
        """Consolidate the live window with a line per pass; saves when done."""
        if self.engine.window_len == 0:
            self.say("[nothing to consolidate: the window is empty]")
            return True
        n = self.engine.window_len
        done = self.engine.consolidate(
            cancel=cancel, on_pass=lambda i, N: self.say(f"[{label}: pass {i}/{N}]"))
        if done:
            self.session.save()
            self.say(f"[consolidated {n} tokens; {self.engine.sleeps} consolidations so far]")
        else:
            self.say("[sleep cancelled; the session is as it was]")
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
            self.engine.reset()
            system = [m for m in self.session.messages[:1] if m["role"] == "system"]
            self.session.messages, self.session.fed_text = system, ""
            self.session.save()
            self.say("[memory cleared: fast weights, window and conversation]")
        elif cmd == "/forget":
            if self.engine.forget():
                self.session.save()
                self.say(f"[forgot the last consolidation; {self.engine.sleeps} remain, "
                         f"{len(self.engine.snapshots)} more can be rolled back]")
            else:
                self.say("[nothing to forget: no consolidation in the history]")
        else:
            self.say(f"unknown command {cmd}; /help lists them")
        return True

    # -- idle sleep ----------------------------------------------------------------------------
    def wants_idle_sleep(self) -> bool:
        e = self.engine
        return self.idle_delay > 0 and e.window_len > 0 and e.window_len >= self.idle_fill * e.sleep.window

    def idle_sleep(self, reader: LineReader):
        """Consolidate in a background thread until done or until a line arrives."""
        cancel = threading.Event()
        result = {}
        self.say("[idle: sleeping on the live window]")
        worker = threading.Thread(
            target=lambda: result.update(done=self.sleep_now(cancel.is_set, "idle sleep")))
        worker.start()
        while worker.is_alive():
            if reader.ready(0.05) or self.interrupt.is_set():
                cancel.set()
                break
        worker.join()  # the main thread touches the engine only once the sleep has stopped
        return result.get("done", False)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, fd=None):
        fd = sys.stdin.fileno() if fd is None else fd
        interactive = os.isatty(fd)
        reader = LineReader(fd)

        def on_sigint(signum, frame):
            self.interrupt.set()

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            if interactive:
                self.say(f"session {self.session.name}: {self.engine.offset} tokens, "
                         f"{self.engine.sleeps} consolidations. /help for commands.")
            while True:
                if interactive:
                    self.say(">>> ", end="")
                self.interrupt.clear()
                line = reader.readline(self.idle_delay if self.wants_idle_sleep() else None)
                if line is None:  # quiet for idle_delay seconds
                    if interactive:
                        self.say("")
                    self.idle_sleep(reader)
                    continue
                if line == "":
                    break
                line = line.strip()
                if not line:
                    continue
                if line.startswith("/"):
                    if not self.command(line):
                        break
                else:
                    self.turn(line)
        finally:
            signal.signal(signal.SIGINT, previous)
            self.session.save()
            self.say(f"[saved session {self.session.name}]")
