//! attnrt
#![no_std]
