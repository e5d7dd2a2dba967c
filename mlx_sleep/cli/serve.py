"""`mlx-sleep serve`: an OpenAI-compatible local server (docs/serve.md)."""

import ipaddress

import click

from .common import (
    Failure,
    Text,
    count,
    load_for_chat,
    run_safely,
    sampling_options,
    session_options,
    sleep_override,
)


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command()
@click.option("--model", required=True, help="A converted model directory (or Hub id).")
@click.option(
    "--host",
    type=Text(),
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (127.0.0.1: this machine only).",
)
@click.option(
    "--port", type=count(0, 65535), default=8080, show_default=True, help="0: any free port."
)
@click.option(
    "--api-key",
    "api_keys",
    type=Text(),
    multiple=True,
    envvar="MLX_SLEEP_API_KEY",
    help="Require 'Authorization: Bearer KEY' (repeatable; or MLX_SLEEP_API_KEY, which keeps "
    "it out of the process list). Each key has its own sessions.",
)
@click.option(
    "--cors",
    type=Text(),
    multiple=True,
    help="Let web pages from this origin call the server (repeatable; off by default).",
)
@click.option(
    "--max-sessions",
    type=count(1, 4096),
    default=8,
    show_default=True,
    help="Conversations held in memory (the least recently used is dropped).",
)
@click.option(
    "--queue",
    type=count(0, 4096),
    default=8,
    show_default=True,
    help="Requests that may wait behind the running one (more: 429).",
)
@session_options
@sampling_options
def serve(
    model,
    host,
    port,
    api_keys,
    cors,
    max_sessions,
    queue,
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
    """Serve a model over an OpenAI-compatible HTTP API, with sleep-aware sessions."""
    import mlx.core as mx

    from ..serve import Server, Settings, listen, uvicorn_server

    def go():
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            raise Failure('serve needs FastAPI and uvicorn: pip install "mlx-sleep[serve]"')
        path, m, tokenizer = load_for_chat(model)
        if seed is not None:
            mx.random.seed(seed)
        sleep = sleep_override(m, window, loops, eviction)
        settings = Settings(
            max_tokens=max_tokens,
            temp=temp,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            stop=tuple(stop),
            system_prompt=system_prompt,
            sleep=sleep,
            history=history,
            idle_delay=idle_delay,
            idle_fill=idle_fill,
            defer=defer_sleep,
            max_pending=max_pending,
            max_sessions=max_sessions,
            queue=queue,
            api_keys=tuple(api_keys),
            cors=tuple(cors),
            hosts=Settings.hosts if loopback(host) else None,
        )
        server = Server(m, tokenizer, path, settings)
        try:
            sock = listen(host, port)
        except OSError as e:
            raise Failure(f"cannot listen on {host}:{port}: {e.strerror or e}")
        bound = sock.getsockname()[1]
        s = sleep or m.sleep_config
        url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/v1"
        click.echo(
            f"[serving {server.model_id} (N = {s.loops}, L = {s.window}, {s.eviction} eviction) "
            f"at {url}; {'API key required' if api_keys else 'no API key'}; Ctrl-C stops]",
            err=True,
        )
        if not loopback(host) and not api_keys:
            click.echo(
                f"warning: listening on {host} without --api-key: anyone who can reach this "
                "port can use the model and read its sessions",
                err=True,
            )
        try:
            uvicorn_server(server).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down
            pass
        click.echo("[stopped; named sessions are saved]", err=True)

    run_safely(go)
