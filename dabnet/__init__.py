"""DABNet (Li et al., BMVC 2019) and its training / evaluation / prediction pipeline."""
from .model import DABNet  # noqa: F401
from .frozen import FrozenDABNet, freeze  # noqa: F401
