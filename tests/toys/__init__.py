"""Tests of the exact Gaussian-mixture toys."""
