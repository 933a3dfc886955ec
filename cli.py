"""perlhf command line: ``python cli.py {fit,validate,test,predict} --config configs/....yaml``."""

from perlhf.cli import main

if __name__ == "__main__":
    main()
