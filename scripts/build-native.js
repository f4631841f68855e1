#!/usr/bin/env node
// Builds the native addon.
//   node scripts/build-native.js               build (cmake-js; CUDA when nvcc is found)
//   node scripts/build-native.js --if-missing  the npm "install" step: skip when a prebuilt or built addon loads
// Environment: TFEW_CUDA=auto|on|off (default auto), TFEW_BUILD_JOBS (default: all cores).
// Without cmake on PATH it falls back to node-gyp and binding.gyp, which builds the CPU backend only.
'use strict';
const { execFileSync, spawnSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const root = path.resolve(__dirname, '..');
const args = process.argv.slice(2);

function addonLoads() {
  try {
    require('node-gyp-build')(root);
    return true;
  } catch {
    return false;
  }
}

function have(cmd) {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

if (args.includes('--if-missing') && addonLoads()) {
  console.log('[tfew] native addon already present; skipping the build');
  process.exit(0);
}

const cuda = (process.env.TFEW_CUDA || 'auto').toUpperCase();
const jobs = process.env.TFEW_BUILD_JOBS || String(os.cpus().length);
const env = { ...process.env, CMAKE_BUILD_PARALLEL_LEVEL: jobs };
if (!env.CUDACXX && fs.existsSync('/usr/local/cuda/bin/nvcc') && !have('nvcc')) env.CUDACXX = '/usr/local/cuda/bin/nvcc';

try {
  if (have('cmake')) {
    const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
    const gen = have('ninja') ? ['-G', 'Ninja'] : [];
    execFileSync(process.execPath, [cmakeJs, 'compile', ...gen, `--CDTFEW_CUDA=${cuda}`], { cwd: root, stdio: 'inherit', env });
  } else {
    console.log('[tfew] cmake not found: building the CPU backend with node-gyp (binding.gyp)');
    const nodeGyp = path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
    execFileSync(process.execPath, [nodeGyp, 'rebuild', `-j`, jobs], { cwd: root, stdio: 'inherit', env });
  }
} catch (e) {
  console.error(`[tfew] native build failed: ${e.message}`);
  process.exit(1);
}
