"""Train a SelfBudgeter model: ``python train.py experiment=sft_toy`` (see configs/ and README.md)."""

from selfbudget_pl.train import main

if __name__ == "__main__":
    main()
