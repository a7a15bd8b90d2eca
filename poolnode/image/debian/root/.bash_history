apt update
apt list --upgradable
apt upgrade -y
systemctl status ssh
df -h
free -m
journalctl -u ssh --since today | tail
vi /etc/ssh/sshd_config.d/50-cloud-init.conf
systemctl reload ssh
crontab -l
ls -la /var/backups
tail -n 50 /var/log/dpkg.log
exit
