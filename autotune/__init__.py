"""dskc.autotune: search spaces as data, the Optuna driver, the results database, per-arch exports.

Public API:
    load_space(stem)                  -> TuneSpace (stem's SPACE/CONSTRAINTS + autotune/spaces/<stem>.json)
    Task(stem, problem, arch, storage, timing="model", sampler="tpe", n_trials=...)
    prepare(task) -> (study, StudyKey)   create/load the study, enqueue its plan: task.n_trials trials, seeds
                                         (default first) then drawn configs or slots the sampler fills
    work(task)    -> trials finished     drain the planned trials (with any other workers, on any machine)
    run(task)     -> optuna.Study        prepare + work in this process
    export(storage, arch, stems=None, root=None) -> [paths]   winners -> autotune/configs/<arch>/<stem>.json
    results(storage, arch=None, stems=None) -> [StudyResult]
    open_storage(url) / StorageError  sqlite path, SQLAlchemy URL (postgresql+psycopg://...) or journal:PATH
    backends.compare(stem, problem, arch, timing) -> decision; backends.export_decision(entry, arch, root=None)
                                      Triton vs CUTLASS per shape -> autotune/configs/<arch>/_backends.json
                                      (`dskc tune --backends triton,cutlass`; read by dskc.select.backends)

The compiler never imports this package: it reads the exported JSON through dskc.select.tuned.lookup.
Timing modes: "model" (a roofline ESTIMATE from the compiled kernel; runs anywhere) and "gpu" (CUDA events).
"""
from dskc.autotune.export import StudyResult, export, results
from dskc.autotune.space import TuneSpace, load_space
from dskc.autotune.storage import StorageError, open_storage
from dskc.autotune.study import StudyKey, Task, prepare, run, work

__all__ = ["StudyResult", "export", "results", "TuneSpace", "load_space", "StorageError", "open_storage",
           "StudyKey", "Task", "prepare", "run", "work"]
