"""Will the plan fit the cluster? A pre-deploy feasibility check.

Ray Serve leaves a replica that cannot be placed pending, with no deadline and no
explanation. `check` answers before deploying: it builds every application of a plan
the way Serve does (`build_app`), takes each deployment's bundles per replica (its
placement group's, or its actor's CPUs, GPUs, memory and custom resources) at
`min_replicas` and at `max_replicas`, and packs them onto the cluster's nodes: the
head node and each worker type up to its `max_workers` (and the cluster's), as the
Ray cluster launcher's `cluster.yaml` describes them. Fractional GPUs are packed per
device, so two 0.6 shares never land on one GPU. The LLM's GPU memory share
(`gpu_memory_utilization`) is compared with the instance's GPU memory where the
instance type is known.

Bundles of one replica go on one node (Serve's placement groups here use PACK). Ray
places replicas one at a time, as they arrive, on a node with room at that moment; it
never moves a placed one. So "fits" has two meanings, and the check answers both:

- **a packing exists** (exact: first-fit decreasing, then a search of every assignment
  when that fails). Without one, Ray leaves replicas pending whatever the order.
- **every arrival order fits**: no order of arrival and no choice of node (or GPU
  device, for a fractional share) by the scheduler can strand a replica. Where some
  can, the plan is *at risk*: whether Ray places it depends on luck, and the report
  says so. Both searches remember the states they have seen; past `SEARCH_BUDGET`
  states the answer is "not proven" rather than a guess.

`tests/integration/test_capacity_agrees_with_ray.py` holds these answers against Ray's
scheduler on simulated clusters.

The family: `inputs` (what the plan asks for, per replica, and what the cluster offers:
`cluster.yaml`'s node types, or the running cluster's nodes; the cluster file's own
checks), `search` (the packing and arrival-order searches, and the cheapest node mix)
and `report` (the verdict as the operator reads it). Imports Ray only inside functions.
"""
