"""Built-in accelerator specs (Step-3 report, Table 4) for the cost model."""
