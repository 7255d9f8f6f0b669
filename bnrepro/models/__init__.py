"""Networks of the paper and the BN layer they share."""
