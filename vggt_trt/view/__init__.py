"""Web viewer (viser) for pcd_inference output folders and the live map; needs requirements-view.txt."""
