"""dskc.benchmark: reproducible benches of every kernel stem and of the whole model, side by side with what a user
would otherwise run, against hardware ceilings measured in the same run.

    dskc bench --suite {smoke,gemm,moe,mla,model,headline,rest,all} [--smoke] [--out DIR] [--budget-s S]
               [--time-limit-s S] [--torch-compile MODE|off] [--json-only] | --render JSON | --validate JSON

Public API: `runner.Options`, `runner.run(opts)` (-> written paths), `runner.build_doc(opts)` (-> result dict),
`schema.SCHEMA`, `schema.validate(doc)`, `schema.load(path)`, `schema.ResultSchemaError`. The result format is
documented in docs/bench-schema.md.
"""
