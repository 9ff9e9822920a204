"""NVlabs EDM's name for sample.py: the sampling commands of the EDM README run unchanged (same flags)."""

from sample import main

if __name__ == '__main__':
    main()
