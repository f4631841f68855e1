// Where tests find their inputs: the golden fixtures (copied into test/fixtures by global-setup.js) and the
// real data set directory (outside the project; tests skip with a message when it is absent).
import * as fs from 'fs';
import * as path from 'path';

const packageRoot = path.resolve(__dirname, '..', '..');

/** test/fixtures (or TFEW_FIXTURES_DIR); throws when no fixtures are present, since tests depend on them. */
export function fixturesDir(): string {
  const local = path.join(packageRoot, 'test', 'fixtures');
  if (fs.existsSync(path.join(local, 'tiny-gated-gelu-untied'))) return local;
  const env = process.env.TFEW_FIXTURES_DIR;
  if (env && fs.existsSync(path.join(env, 'tiny-gated-gelu-untied'))) return env;
  throw new Error(`golden fixtures not found in ${local}; set TFEW_FIXTURES_DIR`);
}

/** The real-data directory (TFEW_DATA_DIR or ../shared/data), or null when it does not exist. */
export function dataDir(): string | null {
  const dir = process.env.TFEW_DATA_DIR ?? path.resolve(packageRoot, '..', 'shared', 'data');
  return fs.existsSync(dir) ? dir : null;
}

/** A file under dataDir(), or null (with a console note naming what is skipped) when it is absent. */
export function dataFile(relative: string, skipping: string): string | null {
  const dir = dataDir();
  const file = dir ? path.join(dir, relative) : null;
  if (!file || !fs.existsSync(file)) {
    // eslint-disable-next-line no-console
    console.warn(`[tfew tests] skipping ${skipping}: ${relative} not found (set TFEW_DATA_DIR)`);
    return null;
  }
  return file;
}
