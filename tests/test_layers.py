"""Arrows point one way (DESIGN.md, "Arrows point one way"), checked by reading imports.

Every module of the package is read with `ast`, and every import of the package it
makes is checked against LAYERS below: top-level imports, lazy ones inside functions,
and those under `if TYPE_CHECKING:` alike (a type hint that names an upper layer's type
is an upward arrow of knowledge too; none is exempt). A module may import its own unit
(its subpackage, or itself) and the layers below its own, never its own layer's other
units nor anything above. Not read: names imported through `importlib` (the package's
lazy `__init__`, `schedulers.scheduler_class`, the CLI's command table), which name
modules of their own unit or, in `__init__`, the public faces.

Two walls that a single order cannot say: the node server is imported by the CLI alone
(`hpc-sandbox serve`), never by the client or the control plane, which share the wire
format (`protocol`) with it and nothing else; and the pool imports no scheduler,
template, spec or runtime although they sit below it (DESIGN: "`SlotPool(sources,
overflow=...)` is all it knows").
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import hpc_sandbox

PACKAGE = Path(hpc_sandbox.__file__).resolve().parent

# Top first. DESIGN.md's order: cli/compat -> connect -> pool/jobs/burst/config ->
# jobspec/schedulers/client/images -> spec/jobfolder/jobstate/protocol/errors; server ->
# runtime -> agent. Where DESIGN names a group, the units inside it that import one
# another are ordered here (one layer each); the modules DESIGN does not name are placed
# where they belong, with the reason.
LAYERS: list[tuple[str, tuple[str, ...], str]] = [
    ("entry", ("__main__",), "`python -m hpc_sandbox`: runs the CLI"),
    ("faces", ("cli", "compat"), "DESIGN: cli/compat"),
    ("wiring", ("connect", "preflight"),
     "DESIGN: connect. preflight (not named): `hpc-sandbox check`'s submit, reach, run, cancel; "
     "it puts jobs, schedulers and the client together for the CLI, as connect does"),
    ("cloud", ("burst",),
     "DESIGN: burst, in pool/jobs/burst/config; just above the pool, because a cloud source uses "
     "a node-server source (composition)"),
    ("parts", ("pool", "jobs", "config"), "DESIGN: pool/jobs/burst/config; none of them knows another"),
    ("schedulers", ("schedulers",),
     "DESIGN: jobspec/schedulers/client/images; just above jobspec, because a scheduler submits what "
     "jobspec renders"),
    ("control", ("jobspec", "client", "images"), "DESIGN: jobspec/schedulers/client/images"),
    ("server", ("server",),
     "DESIGN: server -> runtime -> agent; it knows nothing of schedulers, pool, connect, burst or config "
     "(and is imported by the CLI alone: SERVER_IMPORTED_BY)"),
    ("cloudprofile", ("cloudprofile",),
     "not named in the order (Layout: beside spec): a cloud profile's fields, validated with spec's rules"),
    ("spec", ("spec", "directives"),
     "DESIGN: the bottom group (spec). directives (not named): the scheduler directives a site may add "
     "to a spec, checked as spec values are"),
    ("runtime", ("runtime",),
     "DESIGN: server -> runtime -> agent; below spec, which names the runtimes and network modes a "
     "profile may choose, and runtime.py owns them"),
    ("jobfolder", ("jobfolder",), "DESIGN: the bottom group (jobfolder): what is on disk for a job"),
    ("models", ("models",),
     "not named: the typed shapes the client and the pool pass around (Endpoint, Slot, ToolResult); "
     "made from the wire's answers, beside protocol, below the job folder"),
    ("protocol", ("protocol",), "DESIGN: the bottom group (protocol): the wire format"),
    ("leaves", ("jobstate", "paths", "tls"),
     "DESIGN: the bottom group (jobstate). paths (not named): the workspace path rules; tls (not named): "
     "the job's certificate and TLS contexts; neither knows anything of the package but errors"),
    ("errors", ("errors",), "DESIGN: the bottom group (errors): the one enum of error kinds"),
    ("agent", ("agent",), "DESIGN: the agent imports nothing from the package"),
]
SERVER_IMPORTED_BY = {"cli"}
# Units below a unit that it must still not import, and why.
WALLS: dict[str, tuple[frozenset[str], str]] = {
    "pool": (frozenset({"schedulers", "jobspec", "spec", "runtime", "cloudprofile"}),
             "the pool knows its sources and nothing else: job states reach it as plain types (jobstate) "
             "through a function it is handed"),
}

RANK = {unit: rank for rank, (_, units, _) in enumerate(LAYERS) for unit in units}
LAYER_OF = {unit: name for name, units, _ in LAYERS for unit in units}


@dataclass(frozen=True)
class Arrow:
    source: str  # dotted module name that imports
    target: str  # dotted module name imported
    path: Path
    line: int
    how: str  # "top-level", "lazy" (inside a function) or "TYPE_CHECKING"

    def __str__(self) -> str:
        return (f"{self.path.relative_to(PACKAGE.parent)}:{self.line} ({self.how}) {self.source} imports "
                f"{self.target}")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit(module: str) -> str:
    """The unit a module belongs to: its subpackage or top-level module under hpc_sandbox
    ("" for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def is_module(dotted: str) -> bool:
    relative = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def arrows(path: Path) -> list[Arrow]:
    """Every import of the package that `path` makes, wherever in the file it is."""
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    found: list[Arrow] = []

    def visit(node: ast.AST, how: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for inner in child.body:
                    visit_node(inner, "TYPE_CHECKING")
                for inner in child.orelse:
                    visit_node(inner, how)
            else:
                visit_node(child, how)

    def visit_node(node: ast.AST, how: str) -> None:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from . import x`: x is a module of the package, or a name in its __init__.
            targets = [f"{origin}.{a.name}" if is_module(f"{origin}.{a.name}") else origin for a in node.names]
        else:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and how == "top-level":
                how = "lazy"
            visit(node, how)
            return
        for target in dict.fromkeys(targets):  # one arrow per module, however many names
            if target == "hpc_sandbox" or target.startswith("hpc_sandbox."):
                found.append(Arrow(source, target, path, node.lineno, how))

    visit(ast.parse(path.read_text(), str(path)), "top-level")
    return found


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def wrong_way(arrow: Arrow) -> str | None:
    """Why `arrow` runs against the order (None when it does not)."""
    source, target = unit(arrow.source), unit(arrow.target)
    if target == "" or source == target:
        return None  # the package itself (its __version__), or the module's own unit
    if target == "server" and source not in SERVER_IMPORTED_BY:
        return f"the node server is imported by {', '.join(sorted(SERVER_IMPORTED_BY))} alone"
    if source in WALLS and target in WALLS[source][0]:
        return WALLS[source][1]
    if RANK[target] < RANK[source]:
        return f"layer {LAYER_OF[source]!r} imports layer {LAYER_OF[target]!r}, which is above it"
    if RANK[target] == RANK[source]:
        return f"{source} and {target} are side by side in layer {LAYER_OF[source]!r}: neither imports the other"
    return None


def test_every_module_has_a_place_in_the_layers():
    units = {unit(module_name(path)) for path in all_modules()} - {""}
    assert units - set(RANK) == set(), "place these in LAYERS (tests/test_layers.py), with the reason"
    # In DESIGN's Layout, not in the tree yet: images.py (an issue to come).
    planned = {"images"}
    assert set(RANK) - units <= planned, "LAYERS names units the package does not have"


def test_the_package_door_imports_nothing_at_import_time():
    # Everyone may import `hpc_sandbox` (for __version__) because its __init__ loads
    # nothing of the package until a name is asked for.
    eager = [a for a in arrows(PACKAGE / "__init__.py") if a.how != "lazy"]
    assert eager == []


def test_no_import_runs_upward():
    wrong = [f"{arrow}: {why}" for path in all_modules() for arrow in arrows(path)
             if (why := wrong_way(arrow)) is not None]
    if wrong:
        pytest.fail("imports against DESIGN.md's order:\n  " + "\n  ".join(wrong), pytrace=False)


def test_the_agent_imports_nothing_of_the_package():
    tree = ast.parse((PACKAGE / "agent.py").read_text())
    named = [node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("hpc_sandbox"))
             or isinstance(node, ast.Import) and any(a.name.startswith("hpc_sandbox") for a in node.names)]
    assert named == []


# What `import hpc_sandbox.pool` must not load: no scheduler, template, config, spec,
# runtime, cloud module or SDK, nor anything above the pool.
NOT_FOR_THE_POOL = ("hpc_sandbox.schedulers", "hpc_sandbox.config", "hpc_sandbox.spec", "hpc_sandbox.runtime",
                    "hpc_sandbox.burst", "hpc_sandbox.jobs", "hpc_sandbox.connect", "hpc_sandbox.jobspec",
                    "hpc_sandbox.cloudprofile", "hpc_sandbox.server", "hpc_sandbox.compat", "hpc_sandbox.cli",
                    "jinja2", "yaml", "modal")


def test_importing_the_pool_loads_no_scheduler_config_spec_runtime_or_cloud_module():
    probe = ("import sys, hpc_sandbox.pool\n"
             f"wanted = {NOT_FOR_THE_POOL!r}\n"
             "print('\\n'.join(sorted(m for m in sys.modules if any(m == w or m.startswith(w + '.') for w in wanted))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"import hpc_sandbox.pool loaded: {done.stdout.split()}"
