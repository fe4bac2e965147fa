"""Files dcfast reads and writes: atomic writers (`atomic`), concept image folders (`images`), the run
directory and its one reader `Run` (`runs`), and export of a run's states to diffusers files (`export`).

May import: `dcfast.models`, `dcfast.engine`. Training writes runs and evaluation reads them; both import
this layer, never each other's files.
"""
