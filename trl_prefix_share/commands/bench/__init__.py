"""`trl-prefix-share bench`: stock TRL vs prefix sharing, end to end, in one process (also importable).

from trl_prefix_share.commands.bench import BenchSettings, run_benchmark
report = run_benchmark(BenchSettings(trainers=["dpo"], datasets=["hh_harmless"]))
"""

from trl_prefix_share.commands.bench.runner import BenchReport, BenchSettings, run_benchmark

__all__ = ["BenchReport", "BenchSettings", "run_benchmark"]
