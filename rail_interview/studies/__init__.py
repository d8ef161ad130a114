"""Studies built on training: ``compare`` (methods over seeds on either problem) and ``pass_fail`` (where memory pays).

``pass_fail_runs`` holds the pass/fail study's in-process runs: ``training.step``
with DAPO's draw and the ablations' advantages as hooks.
"""
