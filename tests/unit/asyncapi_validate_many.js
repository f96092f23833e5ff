// Validate several AsyncAPI documents in one node process with the CLI's own ValidationService.
const path = require('path');
const prefix = process.env.NODE_PATH;
const cli = path.join(prefix, '@asyncapi', 'cli', 'lib');
const { ValidationService, ValidationStatus } = require(path.join(cli, 'domains/services/validation.service'));
const { Specification } = require(path.join(cli, 'domains/models/SpecificationFile'));
(async () => {
  const svc = new ValidationService();
  const out = [];
  for (const file of process.argv.slice(2)) {
    const spec = await Specification.fromFile(file);
    const res = await svc.validateDocument(spec, { 'fail-severity': 'warn' });
    if (!res.success) { out.push({ file, valid: false, text: String(res.error && (res.error.message || res.error)) }); continue; }
    const diags = res.data.diagnostics || [];
    out.push({ file, valid: res.data.status === ValidationStatus.VALID,
      text: svc.formatDiagnosticsOutput(diags, 'stylish', 'warn'), count: diags.length });
  }
  process.stdout.write(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(2); });
