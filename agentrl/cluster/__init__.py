"""Rollouts on Ray: env-worker actors play episodes, generation-engine actors sample, a router between them.

The learner stays in the driver process. A run asks for this package with a ``cluster`` section
(:class:`~agentrl.cluster.config.ClusterConfig`); without one nothing here is imported and no Ray starts.

- :mod:`agentrl.cluster.engine`: the generation engine (a policy backend in an actor; weights switch between
  requests, each tagged with its version) and the router (least outstanding requests; an episode sticks to
  one engine; a lost engine's request is replayed on another).
- :mod:`agentrl.cluster.worker`: the env worker (the runner's episode loop in an actor).
- :mod:`agentrl.cluster.rollout`: the driver's side, shaped like a :class:`~agentrl.rollout.runner.Runner`:
  admission (synchronous, or asynchronous with ``max_staleness`` kept by pacing or by dropping), weight sync
  through the object store, replay of episodes lost to the infrastructure, exactly-once accounting.
- :mod:`agentrl.cluster.metrics`: the per-step figures (staleness, busy shares, queues, trained vs sampled).

An episode that spans a weight update continues on the new weights: its engine switches between two of its
requests, never inside one, and the ledger records the version of every turn (``Trajectory.turn_versions``);
its ``policy_version`` is the oldest, so the staleness bound holds for every token, and the truncated IS
weight of each token is taken against the logprob its own sampler reported.
"""

__all__: list[str] = []
