"""The import graph of worker/, tasks/ and bench/ has layers and no circles.

Every module has a place in LAYERS, lowest first; a module imports only from its own
layer or the ones below (function-local imports included: a local import that only
dodges a cycle is a sign the code is in the wrong place).  Within a layer, imports form no
circle.  The one reference that runs up is by name, not by import: Celery's task
registration, where the app (worker/app.py) names the task modules it loads and each of
them imports the app."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: Lowest first.  A new module goes where its imports put it.
LAYERS = [
    ("foundations: settings, errors, keys, tables, address rules, the schedule",
     ["worker", "worker.email", "tasks", "bench", "beat_schedule", "worker.settings", "worker.errors", "worker.logs",
      "worker.keys", "worker.tables", "worker.email.addresses", "worker.charts", "worker.mailbox",
      "worker.mailbox.secrets"]),
    ("storage: connections, records, cursors, the write log, counters, the rollup, client security in SQL",
     ["worker.db", "worker.records", "worker.cursors", "worker.writes", "worker.metrics", "worker.rollups",
      "worker.visibility", "worker.ticks", "worker.schema"]),
    ("the index's scripts, raw mail read, the mailboxes and IMAP sessions",
     ["worker.redis_index", "worker.email.parse", "worker.mailbox.accounts", "worker.mailbox.imap"]),
    ("the index bound to its database; precomputed sets; cached answers",
     ["worker.mirror", "worker.precompute", "worker.answer_cache"]),
    ("rebuilds (a new installation's first write builds its index)",
     ["worker.rebuild"]),
    ("writers: meeting ingestion, access lists, the directory, email ingestion, threading, linking",
     ["worker.access", "worker.ingest", "worker.email.threads", "worker.email.links", "worker.email.thread_state",
      "worker.email.directory", "worker.email.ingest"]),
    ("readers: queries, threads and contacts, reports; the demo data",
     ["worker.query", "worker.email.queries", "worker.reports.shared", "worker.reports.threads",
      "worker.reports.clients", "worker.reports", "worker.seed", "worker.email.synthetic"]),
    ("mailbox sync: IMAP into the email writer", ["worker.mailbox.sync"]),
    ("maintenance and the process context",
     ["worker.maintenance", "worker.context"]),
    ("entry points: the Celery app and tasks, the exporter, the benchmark",
     ["worker.app", "worker.exporter", "tasks.*", "bench.*"]),
    ("the command", ["worker.cli"]),
]

#: References by name that run up a layer, and why they may.
BY_NAME = {("worker.app", "tasks"): "Celery's task registration: the app names the task modules it loads "
                                    "(include=[...]); each of them imports the app"}


def _modules() -> dict:
    files = [p for d in ("worker", "tasks", "bench") for p in (ROOT / d).rglob("*.py") if "migrations" not in p.parts]
    files.append(ROOT / "beat_schedule.py")
    out = {}
    for path in files:
        rel = path.relative_to(ROOT).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return out


def _edges(modules: dict) -> dict:
    """module -> the project modules it imports, anywhere in it."""
    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None
    edges = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                r = resolve(target)
                # A package's __init__ may name its own modules (worker.celery -> worker.app).
                if r and r != name and not (path.name == "__init__.py" and r.startswith(name + ".")):
                    found.add(r)
        edges[name] = found
    return edges


def _layer_of(name: str) -> int:
    for rank, (_, members) in enumerate(LAYERS):
        for member in members:
            if member == name or (member.endswith(".*") and name.startswith(member[:-1])):
                return rank
    raise AssertionError(f"{name} has no layer in tests/test_layers.py LAYERS: place it by what it imports")


def test_every_module_has_a_layer_and_imports_only_from_its_own_or_below():
    modules = _modules()
    edges = _edges(modules)
    upward = [f"{a} (layer {_layer_of(a)}) imports {b} (layer {_layer_of(b)})"
              for a, targets in sorted(edges.items()) for b in sorted(targets) if _layer_of(b) > _layer_of(a)]
    assert upward == []


def test_the_import_graph_has_no_circle():
    edges = _edges(_modules())
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_only_reference_up_by_name_is_celerys_task_registration():
    """The app loads exactly the task modules by name (Celery adds its own built-ins once
    a worker started); nothing else in the app names a module above it."""
    from worker.app import app
    tasks = sorted(name for name in _modules() if name.startswith("tasks."))
    assert sorted(name for name in app.conf.include if not name.startswith("celery.")) == tasks
    assert ("worker.app", "tasks") in BY_NAME
