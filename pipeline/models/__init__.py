"""Backbones (torchvision), Res-Inc, STFN, STCB and baseline heads. Import from the submodules."""
