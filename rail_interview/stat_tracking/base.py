"""Old import path of the tracker interface, kept for code outside this package.

Its jobs moved to modules named for them: the one tracker class is
``tracker.AdvantageTracker`` (``StatTracker`` is an alias of it), input and
state checks are in ``validation``, the gather across ranks in
``distributed``, and ``TrackerStats``, ``UpdateReport``, ``Device`` and
``resolve_device`` in ``types``. Import them from there, or from the package.
"""

from rail_interview.stat_tracking.distributed import all_gather_single
from rail_interview.stat_tracking.tracker import AdvantageTracker
from rail_interview.stat_tracking.types import Device, TrackerStats, UpdateReport, resolve_device

#: The tracker interface: ``AdvantageTracker`` is the one tracker class.
StatTracker = AdvantageTracker

__all__ = ["Device", "StatTracker", "TrackerStats", "UpdateReport", "all_gather_single", "resolve_device"]
