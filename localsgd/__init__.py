"""localsgd: local SGD, post-local SGD and hierarchical local SGD for PyTorch (Lin et al., ICLR 2020)."""

from localsgd.averaging import FlatAverager
from localsgd.comm import Communicator, DistCommunicator, SimCommunicator, init_process_group
from localsgd.engine import CommStats, Engine
from localsgd.outer import OuterStep, SlowMo, diloco, slowmo
from localsgd.policy import Policy
from localsgd.schedule import Level, Schedule, Sync
from localsgd.simulator import Replica, Simulator
from localsgd.wrapper import LocalSGD

__all__ = [
    "CommStats",
    "Communicator",
    "DistCommunicator",
    "Engine",
    "FlatAverager",
    "Level",
    "LocalSGD",
    "OuterStep",
    "Policy",
    "Replica",
    "Schedule",
    "SimCommunicator",
    "Simulator",
    "SlowMo",
    "Sync",
    "diloco",
    "init_process_group",
    "slowmo",
]
__version__ = "0.1.0"
