"""`python -m injector check`: what a cluster lacks for injection, one verdict per line.

A preflight against the current kubeconfig, like `istioctl x precheck` or
`linkerd check`. Each check is a pure function of API objects already
fetched (plain dicts, as the API serves them) and the injector's config, and
returns rows: the check's stable ID (`rows.CheckId`, each explained in
docs/troubleshooting.md), a verdict (`ok`, `warn`, `FAIL`), what it is about,
what was found and what to do. `fetch()` is the only I/O: GETs through the
kubernetes_asyncio ApiClient (no kubectl), and TLS handshakes with the
webhook's endpoints when they are reachable from here. `format_table()` draws the
table. FAIL means something blocks injection (or the pods it makes); the
command then exits 1.

What is checked, and against what:

- the server's version: native sidecars need 1.29+, and the config's
  `cluster.kubernetesVersion` decides which kind the injector adds;
- the nodes with the SSD label and the image-streaming label of the platform
  profile (none is FAIL when pods require them, a warning when they prefer);
- the webhook's caBundle against the serving certificate: against the CA in
  the injector's shared Secret (the issuer of every replica's serving
  certificate), and against the certificate each reachable endpoint presents,
  verified for the name the apiserver asks for;
- the opted-in namespaces (any Pod Security level works: what the injector
  adds passes `restricted`), and an opt-in label where it has no effect;
- the JuiceFS credentials Secret in the injector's namespace, and its copy in
  each opted-in namespace (names of keys only: values are never printed);
- the node agent on each SSD node: its DaemonSet pod there (it mounts for
  every Bento pod, so a node without it starts none), and the node's
  warm-models record (`common.warm`);
- the Bento pods already in the opted-in namespaces: one the webhook
  selects but never injected, an injected sidecar of another image than
  `sidecar.image`, a readiness gate closed for more than 15 minutes.

One module per concern, each check a pure function of what `fetch` read:
`deployed` (the config to judge by), `state` (the fetched objects), `rows`
(the verdicts and the row), `version`, `nodes`, `webhook` (the caBundle),
`certificates`, `endpoints`, `namespaces`, `credentials`, `agent` (the node
agent), `pods` (the Bento pods), `run` (every check in table order), `table`
(rendering), `report` (the table, or a JSON or YAML document for `-o`);
`fetch` is the only I/O.
"""

from injector.check.deployed import ConfigChoice
from injector.check.fetch import Checked, Unreachable, check_cluster
from injector.check.rows import exit_code
from injector.check.table import format_table

__all__ = [
    "Checked",
    "ConfigChoice",
    "Unreachable",
    "check_cluster",
    "exit_code",
    "format_table",
]
