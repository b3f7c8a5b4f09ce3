// Catch2 v2 (one header) and v3 (split headers) behind one include.
// Include it after any ATen/c10 header: c10 defines a glog-style CHECK macro
// (abort on failure, invisible to Catch); whichever definition comes last wins.
#pragma once
#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#else
#include <catch2/catch.hpp>
#endif
