"""`neoctl generate`: send one prompt through the intake and stream the text to the terminal."""

from __future__ import annotations

import sys

import orjson
import typer

from neod.cli.common import Ctl, fail
from neod.client import DaemonUnavailable, RequestError, RequestTimeout


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        ctx: typer.Context,
        prompt: str = typer.Argument(..., help="the prompt text; '-' reads it from stdin"),
        max_tokens: int = typer.Option(128, help="most tokens to generate"),
        temperature: float = typer.Option(0.7, help="0 = greedy"),
        top_p: float = typer.Option(1.0, help="nucleus sampling mass"),
        top_k: int = typer.Option(0, help="0 = no top-k cut"),
        seed: int | None = typer.Option(None, help="sampling seed"),
        stop: list[str] = typer.Option([], help="stop string (repeatable)"),
        ignore_eos: bool = typer.Option(False, help="keep going past end-of-sequence"),
        deadline: float | None = typer.Option(None, help="seconds the daemon may take"),
        json: bool = typer.Option(False, "--json", help="print every event as one JSON line"),
    ) -> None:
        """Stream a completion to stdout (Ctrl-C cancels the request); usage goes to stderr."""
        obj: Ctl = ctx.obj
        text = sys.stdin.read() if prompt == "-" else prompt
        params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                  "top_k": top_k, "seed": seed, "stop": stop, "ignore_eos": ignore_eos,
                  "deadline_s": deadline}
        with obj.intake_client() as client:
            stream = None
            try:
                stream = client.stream(text, **params)
                if json:
                    typer.echo(orjson.dumps({"type": "accepted", "id": stream.id,
                                             "prompt_tokens": stream.prompt_tokens}).decode())
                for delta in stream:
                    if json:
                        typer.echo(orjson.dumps({"type": "delta", **_fields(delta)}).decode())
                    else:
                        sys.stdout.write(delta.text)
                        sys.stdout.flush()
            except KeyboardInterrupt:
                if stream is not None:
                    stream.cancel()
                fail("cancelled", 130)
            except (DaemonUnavailable, RequestTimeout) as exc:
                fail(str(exc))
            except RequestError as exc:
                fail(f"{exc.code}: {exc.message}")
            final = stream.final
            assert final is not None
            if json:
                typer.echo(orjson.dumps({"type": "final", **_fields(final)}).decode())
            else:
                t = final.timings
                typer.echo("")
                usage = final.usage
                typer.echo(f"[{final.finish_reason}; {usage.prompt_tokens} prompt + "
                           f"{usage.completion_tokens} output tokens; TTFT {t.ttft_ms:.1f} ms, "
                           f"{t.tpot_ms:.1f} ms/token]", err=True)
                if final.detail:
                    typer.echo(f"[{final.detail}]", err=True)


def _fields(event: object) -> dict:
    return orjson.loads(orjson.dumps(event))
