"""Command-line front ends (argparse only); library code never parses arguments."""
