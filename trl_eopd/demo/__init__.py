"""`trl-eopd demo`: an OPD-versus-EOPD comparison on a synthetic reasoning task that runs on CPU in minutes."""
