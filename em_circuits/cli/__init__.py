"""Command-line front ends: `em-circuits <command>` and the stage scripts, thin over the package."""
