// Copies the golden fixtures from ../shared/fixtures (generated for this project) into test/fixtures/
// once, so tests read them from inside the project. Tests that need them fail loudly when neither exists.
const fs = require('fs');
const path = require('path');

module.exports = async () => {
  const dest = path.join(__dirname, 'fixtures');
  const src = process.env.TFEW_FIXTURES_DIR || path.resolve(__dirname, '..', '..', 'shared', 'fixtures');
  if (fs.existsSync(path.join(dest, 'tiny-gated-gelu-untied', 'reference.safetensors'))) return;
  if (!fs.existsSync(src)) {
    console.warn(`[tfew tests] no fixtures at ${src}; set TFEW_FIXTURES_DIR`);
    return;
  }
  fs.cpSync(src, dest, { recursive: true });
};
