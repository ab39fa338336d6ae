from local_opt.optimizer import LocalOptimizer  # noqa
__all__ = ["LocalOptimizer"]
