"""The combinations of forced algorithms (``ops.forced_algorithms``) that the tracker tests run every tracker through.

Shared by the matrix (``test_tracker_matrix.py``) and the contract
(``test_tracker_contract.py``), so that a new algorithm joins both at once.
Three of them read a size back to the host (the ``"runs"`` grouping, the
``"distinct"`` batch rows and the ``"reuse"`` numerator): eager on a CPU only;
compiled, the scans, the per-sample rows and the subtraction stand in.
"""

from typing import Dict, List

#: Every algorithm of every operation appears in at least one combination.
ALGORITHM_CHOICES: List[Dict[str, str]] = [
    dict(
        grouping="search",
        segment_sum="index_add",
        batch_stats="one_pass",
        group_stats="dense",
        batch_rows="whole",
        numerator="reuse",
        add_at="scatter_add",
        sort="padded",
        slot_index="int32",
    ),
    dict(
        grouping="counts",
        segment_sum="segment_reduce",
        batch_stats="two_pass",
        group_stats="sorted",
        batch_rows="per_sample",
        numerator="subtract",
        add_at="index_add",
        sort="direct",
        slot_index="int64",
    ),
    dict(
        grouping="scans",
        segment_sum="segment_reduce",
        batch_stats="one_pass",
        group_stats="dense",
        batch_rows="distinct",
        numerator="reuse",
        add_at="scatter_add",
        sort="narrow",
        slot_index="int32",
    ),
    dict(
        grouping="scans",
        segment_sum="index_add",
        batch_stats="two_pass",
        group_stats="sorted",
        batch_rows="per_sample",
        numerator="subtract",
        add_at="index_add",
        sort="padded",
        slot_index="int64",
    ),
    dict(
        grouping="runs",
        segment_sum="index_add",
        batch_stats="one_pass",
        group_stats="sorted",
        batch_rows="distinct",
        numerator="reuse",
        add_at="scatter_add",
        sort="direct",
        slot_index="int32",
    ),
]
