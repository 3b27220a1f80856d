"""crm bench (being written)."""


def add_arguments(p):
    p.add_argument("--quick", action="store_true")


def main(args):
    raise SystemExit("crm bench: not available yet")
