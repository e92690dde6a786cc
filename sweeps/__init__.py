"""The harness around transfer_mnist.py, run as `python -m sweeps`: seeds, several
training-set sizes, learning-rate grids and their selection, --protocol, a backbone per seed,
--workers / --cluster on Ray, --resume, --report and comparisons, the summary over seeds,
figures and warnings.

It imports the template's parts (transfer_mnist: the names its docstring lists); the template
never imports it. The modules, each importing only those above it in this list, and the
run-making ones (up to engine) never a reporting one:

    settings    the protocols, the command line (the template's flags and the harness's)
    stop        Ctrl-C and SIGTERM between and inside runs
    files       files replaced in one step, the lock beside a sweep's CSV
    augment     --augment
    data        a run's images: sizes, --n-val, --stratify, --disjoint, the batches of
                --shuffle and --augment
    folders     image-folder targets
    runs        the Run record, the plan, one run executed, the results CSV
    selection   a rate chosen in each grid (--select), a grid widened (--widen)
    start       the checks before the first run, the outputs
    resume      the settings saved beside a CSV, --resume
    watch       a local Ray instance's processes, watched from outside the driver (stdlib only)
    ray_engine  runs on Ray
    engine      a sweep from start to end
    stats       reporting: means, t intervals, paired-t p-values, Holm       (reporting)
    tables      reporting: the rows as one DataFrame, every table made of it (reporting)
    summary     reporting: the console and Markdown summary, warnings        (reporting)
    figures     reporting: the figures                                       (reporting)
    cli         main(): a sweep, --resume, --report                          (reporting)
"""
