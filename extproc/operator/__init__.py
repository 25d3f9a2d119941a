"""The operator gRPC API (Explain, GetCalibration, RestoreCalibration): code generated from
protos/extproc/operator/ by ``python -m extproc.service.genproto``; the servicer is
extproc/service/operator.py."""
