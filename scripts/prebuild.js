#!/usr/bin/env node
// Makes the prebuilt binary for this platform: builds the addon with cmake-js (CUDA backend compiled in when
// nvcc is present, see build-native.js) and copies it to prebuilds/<platform>-<arch>/@tfew+cuda.napi.node,
// the layout and name tags node-gyp-build loads. (prebuildify 6 only drives node-gyp, which cannot build the
// CUDA backend, so this script does its job for our cmake-js build.)
'use strict';
const { execFileSync, spawnSync } = require('child_process');
const fs = require('fs');
const path = require('path');

const root = path.resolve(__dirname, '..');
execFileSync(process.execPath, [path.join(__dirname, 'build-native.js')], { cwd: root, stdio: 'inherit' });
const built = path.join(root, 'build', 'Release', 'tfew.node');
const dir = path.join(root, 'prebuilds', `${process.platform}-${process.arch}`);
fs.mkdirSync(dir, { recursive: true });
const out = path.join(dir, '@tfew+cuda.napi.node');
fs.copyFileSync(built, out);
if (process.platform !== 'win32') spawnSync('strip', ['--strip-unneeded', out], { stdio: 'inherit' });
const addon = require(out);
console.log(`[tfew] prebuilt ${path.relative(root, out)} (${(fs.statSync(out).size / 1e6).toFixed(1)} MB), CUDA compiled: ${addon.buildInfo.cudaCompiled}`);
