"""`mlx-sleep generate`, `chat`, `sessions`, `consolidate` and `schedule` (docs/chat.md)."""

import json
import sys

import click

from .common import (
    Failure,
    Finite,
    PathArg,
    Text,
    count,
    load_for_chat,
    refuse_unused,
    run_safely,
    sampling_options,
    session_options,
    sleep_override,
)


def read_stdin_text() -> str:
    """`-p -`: standard input as UTF-8 text (bytes that are not text stop here, in one line)."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Failure(
            f"standard input is not UTF-8 text (byte {e.start}: "
            f"{data[e.start : e.start + 1]!r}); -p - reads a text prompt"
        )


@click.command()
@click.option("--model", required=True, help="A converted model directory (or Hub id).")
@click.option(
    "--prompt", "-p", required=True, type=Text(empty=True), help="The prompt ('-' reads stdin)."
)
@click.option("--no-chat-template", is_flag=True, help="Feed the prompt as is.")
@sampling_options
def generate(
    model,
    prompt,
    no_chat_template,
    max_tokens,
    temp,
    top_p,
    top_k,
    min_p,
    repetition_penalty,
    seed,
    stop,
    system_prompt,
    window,
    loops,
    eviction,
):
    """Generate a reply to one prompt, streamed, over the sleep engine."""
    import mlx.core as mx

    from ..generate import Reply, make_sampling, prompt_ids, stream_reply
    from ..sleep import SleepEngine

    def go():
        path, m, tokenizer = load_for_chat(model)
        text = read_stdin_text() if prompt == "-" else prompt
        ids = prompt_ids(tokenizer, text, system_prompt, not no_chat_template)
        if seed is not None:
            mx.random.seed(seed)
        sampler, processors = make_sampling(temp, top_p, top_k, min_p, repetition_penalty)
        engine = SleepEngine(m, sleep_override(m, window, loops, eviction))
        reply = Reply()
        mx.reset_peak_memory()
        for piece in stream_reply(
            engine,
            tokenizer,
            ids,
            max_tokens,
            stop,
            reply=reply,
            sampler=sampler,
            logits_processors=processors,
        ):
            click.echo(piece, nl=False)
        click.echo()
        sleeps = f"{engine.sleeps} consolidation" + ("" if engine.sleeps == 1 else "s")
        click.echo(f"[{reply.speed(len(ids))}, stopped: {reply.stopped}, {sleeps}]", err=True)

    run_safely(go)


@click.command()
@click.option("--model", default=None, help="A converted model directory (default: the session's).")
@click.option("--session", "-s", "session_name", default="default", show_default=True)
@session_options
@sampling_options
def chat(
    model,
    session_name,
    history,
    idle_delay,
    idle_fill,
    defer_sleep,
    max_pending,
    max_tokens,
    temp,
    top_p,
    top_k,
    min_p,
    repetition_penalty,
    seed,
    stop,
    system_prompt,
    window,
    loops,
    eviction,
):
    """Chat with a model; the session (memory included) is saved and resumed by name."""
    import mlx.core as mx

    from ..chat import Chat
    from ..session import open_session, read_meta, session_path

    def go():
        import os

        model_path = model
        if model_path is None:
            if not os.path.isfile(os.path.join(session_path(session_name), "session.json")):
                raise Failure(f"session {session_name!r} does not exist yet: pass --model DIR")
            model_path = read_meta(session_name)["model"]["path"]
        path, m, tokenizer = load_for_chat(model_path)
        session = open_session(
            session_name,
            m,
            path,
            sleep_override(m, window, loops, eviction),
            history,
            system_prompt,
            defer=defer_sleep,
            max_pending=max_pending,
        )
        if system_prompt and session.meta.get("generation"):
            click.echo(
                "[--system-prompt applies to new sessions; this one keeps its own]", err=True
            )
        if seed is not None:
            mx.random.seed(seed)
        try:
            Chat(
                session,
                tokenizer,
                max_tokens=max_tokens,
                stop=stop,
                idle_delay=idle_delay,
                idle_fill=idle_fill,
                sampling=dict(
                    temp=temp,
                    top_p=top_p,
                    top_k=top_k,
                    min_p=min_p,
                    repetition_penalty=repetition_penalty,
                ),
            ).run()
        finally:
            session.close()

    run_safely(go)


@click.group()
def sessions():
    """List, show, export and remove saved chat sessions ($MLX_SLEEP_HOME, default ~/.mlx_sleep)."""


@sessions.command("list")
def sessions_list():
    """One line per session (exit status 1 if one cannot be read)."""
    from ..session import report_sessions

    run_safely(lambda: report_sessions(click.echo))


@sessions.command("show")
@click.argument("name")
def sessions_show(name):
    """The settings and the transcript of one session."""
    from ..chat import plural
    from ..session import pending_starts, read_meta

    def go():
        meta = read_meta(name)
        e = meta["engine"]
        click.echo(
            f"session {name}: model {meta['model']['path']} "
            f"(fingerprint {meta['model']['fingerprint']}, weights {meta['model']['weights']})"
        )
        click.echo(
            f"sleep {meta['sleep']}, {e['offset']} tokens, window "
            f"{e['offset'] - e['window_start']}, {e['sleeps']} consolidations, "
            f"{plural(len(pending_starts(meta)), 'window')} pending (deferred sleep), "
            f"format {meta['format']}"
        )
        for m in meta["transcript"]["messages"]:
            click.echo(f"{m['role']}: {m['content']}")

    run_safely(go)


@sessions.command("export")
@click.argument("name")
@click.option(
    "--out",
    "-o",
    type=PathArg(dir_okay=False),
    default=None,
    help="Write the transcript JSON here (default: stdout).",
)
def sessions_export(name, out):
    """The transcript and settings as JSON (no weights, no state)."""
    from ..io import WRITTEN_BY, check_output_file, write_json
    from ..session import read_meta

    def go():
        meta = read_meta(name)
        doc = {
            k: meta[k]
            for k in ("name", "model", "sleep", "engine", "created", "saved")
            if k in meta
        }
        doc["messages"] = meta["transcript"]["messages"]
        if out is None:
            click.echo(json.dumps(doc, indent=2))
        else:
            check_output_file(out, replace=False, exists_hint="choose another --out")
            write_json(out, dict(doc, written_by=f"{WRITTEN_BY} sessions export"), mode=0o600)
            click.echo(f"wrote {out}")

    run_safely(go)


@sessions.command("rm")
@click.argument("name")
def sessions_rm(name):
    """Remove a session and its memory."""
    from ..session import remove_session

    run_safely(lambda: (remove_session(name), click.echo(f"removed session {name}")))


@click.command()
@click.option("--session", "-s", "names", multiple=True, help="A session (repeatable).")
@click.option("--all", "all_sessions", is_flag=True, help="Every saved session.")
@click.option(
    "--min-fill",
    type=Finite(0, 1),
    default=0.5,
    show_default=True,
    help="Only windows at least this full.",
)
@click.option(
    "--when-idle", is_flag=True, help="Wait until the machine is idle; yield when it is not."
)
@click.option(
    "--idle-source",
    default="auto",
    show_default=True,
    help="auto, mac, load or file:PATH (idle while PATH holds 'idle').",
)
@click.option(
    "--idle-seconds",
    type=Finite(0),
    default=300,
    show_default=True,
    help="mac: no input for this long.",
)
@click.option(
    "--max-load",
    type=Finite(0, above=True),
    default=0.3,
    show_default=True,
    help="load: 1-minute load average per core below this.",
)
@click.option(
    "--poll",
    type=Finite(0, above=True),
    default=30,
    show_default=True,
    help="Seconds between idle checks.",
)
@click.option(
    "--max-wait",
    type=Finite(0),
    default=3600,
    show_default=True,
    help="Give up (exit status 1) when not idle after this many seconds.",
)
def consolidate(
    names, all_sessions, min_fill, when_idle, idle_source, idle_seconds, max_load, poll, max_wait
):
    """Consolidate saved sessions' live windows (sleep outside the chat)."""
    from ..idle import idle_source as make_idle_source
    from ..session import consolidate_sessions, list_sessions

    if not when_idle:
        refuse_unused(
            {"idle_source", "idle_seconds", "max_load", "poll", "max_wait"}, "without --when-idle"
        )

    def go():
        chosen = list_sessions() if all_sessions else list(names)
        if not chosen:
            raise Failure("name sessions with --session NAME, or pass --all")
        idle = make_idle_source(idle_source, idle_seconds, max_load) if when_idle else None
        results = consolidate_sessions(chosen, min_fill, idle, poll, max_wait, echo=click.echo)
        if "skipped: not idle" in results.values():
            raise Failure(
                f"the machine was not idle within --max-wait {max_wait:g} s; the "
                "sessions not consolidated are unchanged (docs/chat.md: idle rules)"
            )

    run_safely(go)


@click.group()
def schedule():
    """Run `consolidate --all --when-idle` periodically in the background."""


def _schedule_command(interval):
    import shutil

    exe = shutil.which("mlx-sleep") or sys.argv[0]
    return [exe, "consolidate", "--all", "--when-idle", "--max-wait", str(max(60, interval // 2))]


@schedule.command("install")
@click.option(
    "--interval", type=count(60), default=1800, show_default=True, help="Seconds between runs."
)
@click.option("--print", "print_only", is_flag=True, help="Print the agent/units, install nothing.")
def schedule_install(interval, print_only):
    """macOS: write and load a launchd agent; elsewhere: print the systemd user timer."""
    from ..idle import install_launchd_agent, launchd_plist, systemd_units

    command = _schedule_command(interval)
    if sys.platform != "darwin":
        click.echo(systemd_units(command, interval))
    elif print_only:
        click.echo(launchd_plist(command, interval).decode())
    else:

        def go():
            path, warning = install_launchd_agent(command, interval)
            click.echo(f"installed {path} (every {interval} s)")
            if warning:
                click.echo(f"warning: {warning}", err=True)

        run_safely(go)


@schedule.command("remove")
def schedule_remove():
    """Unload and delete the launchd agent `schedule install` wrote."""
    from ..idle import remove_launchd_agent

    if sys.platform != "darwin":
        click.echo(
            "systemctl --user disable --now mlx-sleep-consolidate.timer && rm "
            "~/.config/systemd/user/mlx-sleep-consolidate.{service,timer}"
        )
        return
    run_safely(lambda: click.echo(f"removed {remove_launchd_agent()}"))
