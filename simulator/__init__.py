"""Simulator: drives realistic traffic at the lending service and proves it correct."""
