"""Generated code for the Tandem API (see proto/). Do not edit."""
