"""The ``datamesh`` command."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Datamesh Operator: DataProducts on Kubernetes, a discovery catalog and federated queries.", no_args_is_help=True)
dev_cluster = typer.Typer(help="A local kube-apiserver + etcd + kube-controller-manager for development.", no_args_is_help=True)
app.add_typer(dev_cluster, name="dev-cluster")
console = Console()


@app.command()
def operator(
    namespace: Annotated[Optional[list[str]], typer.Option("--namespace", "-n", help="Watch only this namespace (repeatable; globs allowed).")] = None,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Watch every namespace (the default when no --namespace is given).")] = False,
    liveness: Annotated[str, typer.Option(help="Liveness endpoint URL, served by kopf.")] = "http://0.0.0.0:8081/healthz",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the DataProduct operator (kopf) against the current kubeconfig or in-cluster account."""
    from prometheus_client import start_http_server

    from datamesh.handlers import run_operator
    from datamesh.settings import get_settings

    if namespace and all_namespaces:
        raise typer.BadParameter("use either --namespace or --all-namespaces, not both")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    asyncio.run(run_operator(settings, namespaces=namespace or None, liveness_endpoint=liveness or None))


@app.command()
def crd(
    write: Annotated[Optional[Path], typer.Option(help="Write the CRD file into this folder instead of printing it.")] = None,
    check: Annotated[Optional[Path], typer.Option(help="Exit 1 if the CRD file in this folder is stale.")] = None,
) -> None:
    """Print, write or check the DataProduct CRD generated from the pydantic models."""
    from datamesh.crdgen import CRD_FILE, crd_is_current, render_crd, write_crd

    if check is not None:
        if not crd_is_current(check):
            typer.echo(f"{check / CRD_FILE} is stale: run `datamesh crd --write {check}` and commit it", err=True)
            raise typer.Exit(1)
        typer.echo(f"{check / CRD_FILE} is current")
    elif write is None:
        typer.echo(render_crd(), nl=False)
    else:
        typer.echo(f"wrote {write_crd(write)}")


@app.command()
def settings() -> None:
    """Show the operator settings in effect (from DATAMESH_* environment variables)."""
    from datamesh.settings import OperatorSettings

    current = OperatorSettings()
    table = Table("variable", "value", "meaning")
    for name, info in OperatorSettings.model_fields.items():
        table.add_row(f"DATAMESH_{name.upper()}", repr(getattr(current, name)), info.description or "")
    console.print(table)


@dev_cluster.command("up")
def dev_cluster_up(workdir: Annotated[Optional[Path], typer.Option(help="Where certificates, data and logs go.")] = None) -> None:
    """Start the local control plane in the background (builds it from Go modules on first use)."""
    from datamesh import devcluster

    kubeconfig = devcluster.up(workdir)
    typer.echo(f"export KUBECONFIG={kubeconfig}")


@dev_cluster.command("down")
def dev_cluster_down(workdir: Annotated[Optional[Path], typer.Option()] = None) -> None:
    """Stop the local control plane and remove its data."""
    from datamesh import devcluster

    typer.echo("stopped" if devcluster.down(workdir) else "no dev cluster was running")


@dev_cluster.command("kubectl", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def dev_cluster_kubectl(ctx: typer.Context, workdir: Annotated[Optional[Path], typer.Option()] = None) -> None:
    """Run the built kubectl against the dev cluster: `datamesh dev-cluster kubectl get dp -A`."""
    import os

    from datamesh import devcluster

    kubeconfig = (workdir or devcluster.default_workdir()) / "kubeconfig"
    if not kubeconfig.exists():
        raise typer.BadParameter("no dev cluster is running: start one with `datamesh dev-cluster up`")
    kubectl = devcluster.tool_paths(["k8s"])["kubectl"]
    os.execv(kubectl, [str(kubectl), "--kubeconfig", str(kubeconfig), *ctx.args])


if __name__ == "__main__":
    app()
