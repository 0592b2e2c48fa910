"""`neoctl keys`: create a CURVE key pair for the daemon or for a producer."""

from __future__ import annotations

from pathlib import Path

import typer
import zmq.auth


def register(app: typer.Typer) -> None:
    @app.command()
    def keys(
        directory: Path = typer.Argument(..., help="folder to write NAME.key and NAME.key_secret"),
        name: str = typer.Option("neod", help="file name stem, e.g. neod or a producer's name"),
    ) -> None:
        """Write NAME.key (public, share it) and NAME.key_secret (keep it private, mode 0600)."""
        directory.mkdir(parents=True, exist_ok=True)
        public, secret = zmq.auth.create_certificates(str(directory), name)
        Path(secret).chmod(0o600)
        typer.echo(f"public key: {public}\nsecret key: {secret}")
        typer.echo("daemon: [server] curve_secret_key_file = the daemon's .key_secret; copy each "
                   "producer's .key into [server] curve_authorized_keys_dir.\nproducer: "
                   "Client(..., curve_server_key_file=<daemon .key>, "
                   "curve_client_key_file=<own .key_secret>)")
