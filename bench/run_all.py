"""Run the benchmark suite (kernels, networks, sampling) and chart the speed-ups; one command on a GPU.

  python -m bench.run_all [--only group_norm,resample,attention,model,sample] [--quick] [--out DIR]

Each benchmark runs in its own process with a time limit, so one failure or hang does not stop the rest.
Results are JSON lines in --out (default bench/results/), plus speedups.png.
"""

import argparse
import subprocess
import sys
import time

from bench import harness

SUITE = {
    'group_norm': ['-m', 'bench.bench_group_norm'],
    'resample': ['-m', 'bench.bench_resample'],
    'attention': ['-m', 'bench.bench_attention'],
    'model': ['-m', 'bench.bench_model', '--profile'],
    'sample': ['-m', 'bench.bench_sample'],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--only', default=','.join(SUITE))
    p.add_argument('--quick', action='store_true')
    p.add_argument('--timeout', type=int, default=900, help='seconds per benchmark')
    p.add_argument('--out', default=harness.RESULTS_DIR)
    args = p.parse_args(argv)
    status = {}
    for name in args.only.split(','):
        cmd = [sys.executable] + SUITE[name] + ['--out', args.out] + (['--quick'] if args.quick else [])
        t0 = time.time()
        try:
            rc = subprocess.run(cmd, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 'timeout'
        status[name] = (rc, time.time() - t0)
    try:
        subprocess.run([sys.executable, '-m', 'bench.chart', '--results', args.out], timeout=120)
    except Exception as e:  # the chart is a convenience; the JSON lines are the results
        print(f'chart failed: {e}')
    for name, (rc, seconds) in status.items():
        print(f'{name:12s} exit {rc}  {seconds:6.1f} s')


if __name__ == '__main__':
    main()
