"""localsgd: local SGD, post-local SGD and hierarchical local SGD for PyTorch (Lin et al., ICLR 2020)."""

from localsgd.averaging import FlatAverager
from localsgd.comm import Communicator, DistCommunicator, SimCommunicator, init_process_group
from localsgd.engine import CommStats, Engine
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
    "Replica",
    "Schedule",
    "SimCommunicator",
    "Simulator",
    "Sync",
    "init_process_group",
]
__version__ = "0.1.0"
