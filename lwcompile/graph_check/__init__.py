"""Is a traced graph faithful to eager? Lockstep comparison against a recorded eager run,
and replay of calls torch.fx could not trace."""
