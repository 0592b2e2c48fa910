"""Load-aware scheduling (NEO): the pure scheduler, its cost model, profile store and advisor.

Nothing here imports torch or touches a device, a socket or a clock; tests check it.
"""

from neod.sched.advisor import predict_workload
from neod.sched.calibration import (
    CalibratedCostModel,
    corrections_path,
    load_corrections,
    save_corrections,
)
from neod.sched.cost import BatchLoad, CostModel, ZeroCostModel, pipelined_s, sequential_s
from neod.sched.plan import Plan, check_plan
from neod.sched.predictor import TableCostModel
from neod.sched.profile import (
    Profile,
    ProfileKey,
    Table1D,
    Table2D,
    describe_cpu_paced,
    load_profile,
    profile_key,
    profile_path,
    save_profile,
)
from neod.sched.scheduler import Scheduler
from neod.sched.split import SplitRule
from neod.sched.views import POLICIES, CacheView, Limits, Residence, SeqView, blocks_for

__all__ = [
    "describe_cpu_paced",
    "POLICIES",
    "BatchLoad",
    "CacheView",
    "CalibratedCostModel",
    "corrections_path",
    "load_corrections",
    "save_corrections",
    "CostModel",
    "Limits",
    "Plan",
    "Profile",
    "ProfileKey",
    "Residence",
    "Scheduler",
    "SeqView",
    "SplitRule",
    "Table1D",
    "Table2D",
    "TableCostModel",
    "ZeroCostModel",
    "blocks_for",
    "check_plan",
    "load_profile",
    "pipelined_s",
    "predict_workload",
    "profile_key",
    "profile_path",
    "save_profile",
    "sequential_s",
]
