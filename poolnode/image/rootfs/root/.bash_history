apt update
apt upgrade -y
systemctl status nginx
df -h
free -m
tail -n 50 /var/log/syslog
cd /var/www/html
ls -la
cd
crontab -l
uptime
exit
