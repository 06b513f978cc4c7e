"""Measuring Sift: `retrieval` (BEIR nDCG/Recall/MRR, TREC runs) and `qa` (SQuAD EM/F1)."""
