"""The mutating admission webhook: ``credential-sidecar webhook --config FILE``.

It adds the sidecar to pods annotated ``credential-sidecar.io/inject: "true"``
(docs/deployment.md, "Automatic injection"). Three modules, one job each:

| module | its one job |
|---|---|
| ``settings`` | the webhook's own YAML in, frozen validated settings out (field-path messages) |
| ``mutate`` | pure: an AdmissionReview in, the review's answer (and its JSONPatch) out |
| ``server`` | HTTPS (certificate reread when it changes), ``/mutate``, probes, one log line per decision |

Nothing here imports the data plane: the webhook never sees a secret, only pod specs.
"""
