"""`tunepilot` command line: every subcommand. Front end only: parse, call tools, render.

Heavy libraries (torch, transformers, langchain) are imported inside the commands that
need them, so `tunepilot --help` and catalog look-ups start fast.
Errors meant for people (TunepilotError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from tools.schemas import TunepilotError

app = typer.Typer(
    name="tunepilot",
    help="How should I fine-tune model X on my hardware? Estimate, plan, script and trial-run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one clear line and exit (no traceback)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_json(obj) -> None:
    """Machine output: plain JSON on stdout, nothing else."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("tunepilot")
        except PackageNotFoundError:  # running from a checkout without install
            v = "0.1.0"
        typer.echo(f"tunepilot {v}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
) -> None:
    """tunepilot: plan, estimate, script and trial-run LLM fine-tuning."""


# ---------------------------------------------------------------------------------------
# Foundation (issue 2): models, model, gpus
# ---------------------------------------------------------------------------------------

@app.command()
def models(query: Optional[str] = typer.Argument(None, help="Filter by substring of the id or family."),
           json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the bundled model catalog."""
    raise NotImplementedError


@app.command()
def model(model_id: str = typer.Argument(..., help="Hub id, catalog name or local path (config.json or model dir)."),
          json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show one model's architecture and exact parameter count."""
    raise NotImplementedError


@app.command()
def gpus(json_out: bool = typer.Option(False, "--json", help="Print JSON."),
         local: bool = typer.Option(False, "--local", help="Detect the GPUs of this machine instead of listing the catalog.")) -> None:
    """List the GPU catalog, or detect local GPUs."""
    raise NotImplementedError


# ---------------------------------------------------------------------------------------
# Memory engine (issue 3): estimate
# ---------------------------------------------------------------------------------------

@app.command()
def estimate() -> None:
    """Estimate per-GPU training memory of a setup (simulated dry run, or --fast analytic)."""
    raise NotImplementedError


# ---------------------------------------------------------------------------------------
# Planner (issue 4): plan
# ---------------------------------------------------------------------------------------

@app.command()
def plan() -> None:
    """Search the best setup that fits the hardware, ranked by time to train."""
    raise NotImplementedError


# ---------------------------------------------------------------------------------------
# Script and trial (issue 5)
# ---------------------------------------------------------------------------------------

@app.command()
def script() -> None:
    """Render a ready-to-run training script for a setup file."""
    raise NotImplementedError


@app.command()
def trial() -> None:
    """Trial-run a setup for a few steps and compare measured memory to the estimate."""
    raise NotImplementedError


# ---------------------------------------------------------------------------------------
# Agent (issue 6) and Slack (issue 7)
# ---------------------------------------------------------------------------------------

@app.command()
def chat() -> None:
    """Interactive chat with the tunepilot agent."""
    raise NotImplementedError


@app.command()
def ask() -> None:
    """One-shot question to the agent."""
    raise NotImplementedError


@app.command()
def slack(
    http: bool = typer.Option(False, "--http", help="Serve Slack's Events API over HTTP (needs SLACK_SIGNING_SECRET) instead of Socket Mode (SLACK_APP_TOKEN)."),
    port: int = typer.Option(3000, "--port", help="Port for --http; Slack posts to http://HOST:PORT/slack/events."),
    db: Optional[Path] = typer.Option(None, "--db", help="SQLite file keeping every thread's conversation (default $TUNEPILOT_HOME/slack.sqlite)."),
    trial_users: Optional[str] = typer.Option(None, "--trial-users", help="Comma-separated Slack user ids allowed to start trial runs (default $TUNEPILOT_SLACK_TRIAL_USERS; nobody if unset)."),
    llm: Optional[str] = typer.Option(None, "--llm", help="Chat model as provider:model, e.g. openai:gpt-4o-mini (default $TUNEPILOT_LLM)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server URL (vLLM, Ollama, llama.cpp, LM Studio)."),
    slack_api_url: Optional[str] = typer.Option(None, "--slack-api-url", help="Slack Web API base URL (default https://slack.com/api/; for Slack-compatible gateways)."),
) -> None:
    """Run the Slack bot: answers mentions, DMs and thread follow-ups; uploads train.py to the thread."""
    from pydantic import ValidationError

    from tools.schemas import format_validation_error

    if not 1 <= port <= 65535:
        fail(f"--port {port}: choose a port between 1 and 65535")
    try:
        from agent.slack_bot import run

        run(http=http, port=port, db=db, trial_users=trial_users, llm=llm, base_url=base_url, slack_api_url=slack_api_url)
    except TunepilotError as e:
        fail(str(e))
    except ValidationError as e:
        fail(format_validation_error(e))
    except KeyboardInterrupt:
        err_console.print("Slack bot stopped")


def main() -> None:
    """Console-script entry point: people see one line per error, never a traceback."""
    try:
        app()
    except TunepilotError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
