"""Per-prompt memory inside the trainers people run: TRL and verl.

Each integration is its own module, imported by name, so that the library
imports without either trainer installed:

* ``rail_interview.integrations.trl``: ``TrackedGRPOTrainer`` and
  ``TrackedRLOOTrainer``, TRL's trainers with a tracker of this package
  computing their advantages (``pip install -e ".[trl]"``).
* ``rail_interview.integrations.verl``: advantage estimators over a
  tracker, registered through verl's own ``register_adv_est``
  (``pip install -e ".[verl]"``).

The pages ``docs/trl.md`` and ``docs/verl.md`` show the lines a user
changes, what the tests prove and the versions tested.
"""
